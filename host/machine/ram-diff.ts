/**
 * A clone's migration stream cut down to the RAM that differs from its
 * template. A clone maps its template's memory file private, so QEMU's
 * stream carries every non-zero page of the guest; a clone restored the way
 * a fork is (the same file mapped private) already has the template's pages,
 * and needs only those the clone changed. This reads QEMU's precopy stream
 * (file header, configuration section, the iterable "ram" section's START,
 * PART and END records), drops each page record of the template-backed RAM
 * block whose content equals the template's page (a zero-page record where
 * the template's page is zero), rewrites the CONTINUE flag so every kept
 * record still names its block, and copies everything after the RAM (the
 * devices' sections) byte for byte. Anything it does not know is refused
 * (RamDiffError): the caller then keeps the whole stream.
 * The format: QEMU migration/savevm.c (sections) and migration/ram.c (page records).
 */
import { ScionError } from '../../common/errors.ts';
import { isZero } from '../../registry/snapshot-artifact.ts';

export class RamDiffError extends ScionError {}

const MAGIC = 0x5145564d;
const SECTION = { START: 0x01, PART: 0x02, END: 0x03, FULL: 0x04, SUBSECTION: 0x05, CONFIGURATION: 0x07, COMMAND: 0x08, FOOTER: 0x7e, EOF: 0x1f } as const;
const FLAG = { ZERO: 0x02, MEM_SIZE: 0x04, PAGE: 0x08, EOS: 0x10, CONTINUE: 0x20, MULTIFD_FLUSH: 0x200 } as const;
const KNOWN_FLAGS = FLAG.ZERO | FLAG.MEM_SIZE | FLAG.PAGE | FLAG.EOS | FLAG.CONTINUE | FLAG.MULTIFD_FLUSH;
export const PAGE_BYTES = 4096;

/** What the cut kept and dropped. */
export interface RamDiffStats {
  pages: number;
  kept: number;
  bytesIn: number;
  bytesOut: number;
}

/** A template page, by byte offset in the template-backed RAM block. */
export type TemplatePage = (offset: number) => Buffer;

class Reader {
  pos = 0;
  constructor(readonly b: Buffer) {}
  need(n: number): void {
    if (this.pos + n > this.b.length) throw new RamDiffError('E_RAM_DIFF', `the stream ends at byte ${this.b.length}, ${n} more expected at ${this.pos}`);
  }
  u8(): number {
    this.need(1);
    return this.b[this.pos++];
  }
  u32(): number {
    this.need(4);
    const v = this.b.readUInt32BE(this.pos);
    this.pos += 4;
    return v;
  }
  u64(): bigint {
    this.need(8);
    const v = this.b.readBigUInt64BE(this.pos);
    this.pos += 8;
    return v;
  }
  bytes(n: number): Buffer {
    this.need(n);
    const v = this.b.subarray(this.pos, this.pos + n);
    this.pos += n;
    return v;
  }
  str(): string {
    return this.bytes(this.u8()).toString('latin1');
  }
}

/** Cut `stream` to the pages of block `block` that differ from the template's (see the header). Pure over its inputs. */
export function diffAgainstTemplate(stream: Buffer, block: string, templatePage: TemplatePage): { out: Buffer[]; stats: RamDiffStats } {
  const r = new Reader(stream);
  const out: Buffer[] = [];
  const stats: RamDiffStats = { pages: 0, kept: 0, bytesIn: stream.length, bytesOut: 0 };
  const fail = (why: string) => new RamDiffError('E_RAM_DIFF', `at byte ${r.pos} of the stream: ${why}`);
  if (r.u32() !== MAGIC || r.u32() !== 3) throw fail('not a QEMU migration stream of version 3');
  let copiedTo = 0;
  const copyUpTo = (end: number) => {
    if (end > copiedTo) out.push(stream.subarray(copiedTo, end));
    copiedTo = end;
  };
  if (r.u8() !== SECTION.CONFIGURATION) throw fail('no configuration section');
  r.bytes(r.u32()); // the machine type
  if (stream[r.pos] === SECTION.SUBSECTION) throw fail('the configuration has subsections this reader does not know');
  let ramId = -1;
  let lastBlock: string | undefined; // the block of the last record kept: what CONTINUE refers to in the output
  let lastBlockInStream: string | undefined; // and in the input
  for (;;) {
    const start = r.pos;
    const type = r.u8();
    if (type === SECTION.START) {
      const id = r.u32();
      const name = r.str();
      r.u32(); // instance
      r.u32(); // version
      if (name !== 'ram') throw fail(`an iterable section "${name}" besides ram`);
      ramId = id;
    } else if (type === SECTION.PART || type === SECTION.END) {
      if (r.u32() !== ramId) throw fail('a section part of something other than ram');
    } else if (type === SECTION.COMMAND) {
      // a command between sections (e.g. the end of precopy): be16 command, be16 length, its data
      r.bytes(2);
      r.bytes(r.bytes(2).readUInt16BE(0));
      copyUpTo(r.pos);
      continue;
    } else if (type === SECTION.FULL || type === SECTION.EOF) {
      // the devices' sections: copied whole from here
      copyUpTo(start);
      out.push(stream.subarray(start));
      stats.bytesOut = out.reduce((n, b) => n + b.length, 0);
      return { out, stats };
    } else throw fail(`section type 0x${type.toString(16)} where ram's sections are expected`);
    copyUpTo(r.pos);
    // the section's page records, up to its EOS
    for (;;) {
      const header = r.u64();
      const flags = Number(header & 0xfffn);
      const offset = Number(header & ~0xfffn);
      if (flags & ~KNOWN_FLAGS) throw fail(`page record flags 0x${flags.toString(16)}`);
      if (flags & FLAG.MEM_SIZE) {
        let left = offset;
        while (left > 0) {
          r.str();
          left -= Number(r.u64());
        }
        if (left !== 0) throw fail('the RAM block list does not add up to the size it states');
        copyUpTo(r.pos);
        continue;
      }
      if (flags & FLAG.EOS) {
        copyUpTo(r.pos);
        break;
      }
      if (flags & FLAG.MULTIFD_FLUSH) {
        copyUpTo(r.pos);
        continue;
      }
      if (!(flags & (FLAG.PAGE | FLAG.ZERO))) throw fail(`a page record of neither page nor zero (0x${flags.toString(16)})`);
      let name: string;
      if (flags & FLAG.CONTINUE) {
        if (lastBlockInStream === undefined) throw fail('CONTINUE before any block');
        name = lastBlockInStream;
      } else name = r.str();
      lastBlockInStream = name;
      const data = flags & FLAG.PAGE ? r.bytes(PAGE_BYTES) : r.bytes(1);
      copiedTo = r.pos; // this record is re-emitted below, or dropped
      if (name === block) {
        stats.pages++;
        const tpl = templatePage(offset);
        const same = flags & FLAG.PAGE ? data.equals(tpl) : data[0] === 0 && isZero(tpl);
        if (same) continue;
        stats.kept++;
      }
      out.push(record(offset, flags, name, lastBlock, data));
      lastBlock = name;
    }
    // the section's footer
    if (stream[r.pos] === SECTION.FOOTER) {
      r.u8();
      r.u32();
      copyUpTo(r.pos);
    }
  }
}
/** One page record, its CONTINUE flag set only when `name` is the block of the record kept before it. */
function record(offset: number, flags: number, name: string, lastKept: string | undefined, data: Buffer): Buffer {
  const cont = name === lastKept;
  const f = (flags & ~FLAG.CONTINUE) | (cont ? FLAG.CONTINUE : 0);
  const head = Buffer.alloc(8 + (cont ? 0 : 1 + name.length));
  head.writeBigUInt64BE(BigInt(offset) | BigInt(f));
  if (!cont) {
    head[8] = name.length;
    head.write(name, 9, 'latin1');
  }
  return Buffer.concat([head, data]);
}
