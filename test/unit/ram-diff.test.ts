/**
 * Cutting a clone's migration stream to the pages that differ from its
 * template (host/machine/ram-diff.ts), on a stream laid out as QEMU writes
 * one (header, configuration, ram START/PART with page records, a device section).
 */
import { describe, expect, it } from 'vitest';
import { diffAgainstTemplate, PAGE_BYTES } from '../../host/machine/ram-diff.ts';

const u8 = (n: number) => Buffer.from([n]);
const u32 = (n: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
};
const u64 = (n: number) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(n));
  return b;
};
const str = (s: string) => Buffer.concat([u8(s.length), Buffer.from(s, 'latin1')]);
const page = (fill: number) => Buffer.alloc(PAGE_BYTES, fill);
const PAGE = 0x08;
const ZERO = 0x02;
const CONT = 0x20;
const EOS = 0x10;

const template = [page(1), page(2), page(0), page(4)];
const head = Buffer.concat([u32(0x5145564d), u32(3), u8(0x07), u32(11), Buffer.from('pc-q35-10.0'), u8(0x01), u32(2), str('ram'), u32(0), u32(4)]);
const memSize = Buffer.concat([u64(5 * PAGE_BYTES + 0x04), str('mem'), u64(4 * PAGE_BYTES), str('pc.rom'), u64(PAGE_BYTES), u64(EOS), u8(0x7e), u32(2)]);
const devices = Buffer.concat([u8(0x04), u32(3), str('timer'), u32(0), u32(2), Buffer.from('opaque device state'), u8(0x1f)]);
const part = (records: Buffer[]) => Buffer.concat([u8(0x02), u32(2), ...records, u64(EOS), u8(0x7e), u32(2)]);

describe("a clone's stream cut to what differs from its template", () => {
  it('drops pages equal to the template, keeps the rest with their block named where the record before was dropped, and copies the devices byte for byte', () => {
    const stream = Buffer.concat([
      head,
      memSize,
      part([
        Buffer.concat([u64(0 | PAGE), str('mem'), page(1)]), // same as the template: dropped
        Buffer.concat([u64(PAGE_BYTES | PAGE | CONT), page(9)]), // changed: kept, must now name its block
        Buffer.concat([u64((2 * PAGE_BYTES) | ZERO | CONT), u8(0)]), // zero where the template is zero: dropped
        Buffer.concat([u64((3 * PAGE_BYTES) | ZERO | CONT), u8(0)]), // zeroed by the clone: kept
        Buffer.concat([u64(0 | PAGE), str('pc.rom'), page(7)]), // another block: always kept
      ]),
      devices,
    ]);
    const { out, stats } = diffAgainstTemplate(stream, 'mem', (off) => template[off / PAGE_BYTES]);
    expect(stats).toMatchObject({ pages: 4, kept: 2 });
    expect(Buffer.concat(out)).toEqual(
      Buffer.concat([
        head,
        memSize,
        part([
          Buffer.concat([u64(PAGE_BYTES | PAGE), str('mem'), page(9)]),
          Buffer.concat([u64((3 * PAGE_BYTES) | ZERO | CONT), u8(0)]),
          Buffer.concat([u64(0 | PAGE), str('pc.rom'), page(7)]),
        ]),
        devices,
      ]),
    );
  });
  it('refuses what it does not know rather than guess: another iterable section, unknown flags, a truncated stream', () => {
    const other = Buffer.concat([head.subarray(0, 24) /* header and configuration */, u8(0x01), u32(5), str('dirty-bitmap'), u32(0), u32(1)]);
    expect(() => diffAgainstTemplate(other, 'mem', () => page(0))).toThrow(/iterable section "dirty-bitmap"/);
    const flags = Buffer.concat([head, memSize, part([Buffer.concat([u64(0x40), str('mem')])])]);
    expect(() => diffAgainstTemplate(flags, 'mem', () => page(0))).toThrow(/flags 0x40/);
    const cut = Buffer.concat([head, memSize, part([Buffer.concat([u64(0 | PAGE), str('mem'), page(1)])])]).subarray(0, head.length + memSize.length + 100);
    expect(() => diffAgainstTemplate(cut, 'mem', () => page(1))).toThrow(/ends at byte/);
  });
});
