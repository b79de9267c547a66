/**
 * Deterministic stripping of ELF64 executables and shared objects: the
 * `.debug_*`/`.zdebug_*` sections and the static symbol table (`.symtab`,
 * `.strtab`) go, like `strip --strip-all`, and nothing the loader reads
 * changes. Pure: the output depends on the input bytes alone (no tool
 * version on the build host can change the image).
 *
 * Why our own and not binutils' objcopy: the build must give the same bytes
 * on any host, and objcopy's output layout has changed between releases.
 * The method is the conservative one: every byte up to the end of the last
 * loaded segment is kept as it is; the non-loaded sections that remain are
 * packed after it, and a new section header table follows them. A file whose
 * layout does not allow that (a removed section before a loaded one, a kept
 * section linking to a removed one) is left unchanged rather than guessed at.
 */

const SHF_ALLOC = 0x2;
const SHF_INFO_LINK = 0x40;
const SHT_NOBITS = 8;
const ET_EXEC = 2,
  ET_DYN = 3;
const SHDR_SIZE = 64;

export function removableSection(name: string): boolean {
  return name.startsWith('.debug_') || name.startsWith('.zdebug_') || name === '.symtab' || name === '.strtab';
}

interface Shdr {
  index: number;
  name: string;
  raw: Buffer;
  type: number;
  flags: bigint;
  offset: number;
  size: number;
  link: number;
  info: number;
  align: number;
}

const align = (n: number, a: number) => (a > 1 ? Math.ceil(n / a) * a : n);

/** The stripped file, or undefined when there is nothing to strip (or it is not safe to). */
export function stripElf(b: Buffer): Buffer | undefined {
  if (b.length < 64 || b.readUInt32BE(0) !== 0x7f454c46 || b[4] !== 2 || b[5] !== 1) return undefined;
  const etype = b.readUInt16LE(0x10);
  if (etype !== ET_EXEC && etype !== ET_DYN) return undefined; // relocatable objects (kernel modules) keep their symbols
  const phoff = Number(b.readBigUInt64LE(0x20));
  const shoff = Number(b.readBigUInt64LE(0x28));
  const phentsize = b.readUInt16LE(0x36),
    phnum = b.readUInt16LE(0x38);
  const shentsize = b.readUInt16LE(0x3a),
    shnum = b.readUInt16LE(0x3c),
    shstrndx = b.readUInt16LE(0x3e);
  if (!shoff || shentsize !== SHDR_SIZE || shnum === 0 || shstrndx >= shnum || shoff + shnum * SHDR_SIZE > b.length) return undefined;

  const shdrs: Shdr[] = [];
  for (let i = 0; i < shnum; i++) {
    const o = shoff + i * SHDR_SIZE;
    shdrs.push({
      index: i,
      name: '',
      raw: Buffer.from(b.subarray(o, o + SHDR_SIZE)),
      type: b.readUInt32LE(o + 4),
      flags: b.readBigUInt64LE(o + 8),
      offset: Number(b.readBigUInt64LE(o + 0x18)),
      size: Number(b.readBigUInt64LE(o + 0x20)),
      link: b.readUInt32LE(o + 0x28),
      info: b.readUInt32LE(o + 0x2c),
      align: Number(b.readBigUInt64LE(o + 0x30)),
    });
  }
  const strtab = shdrs[shstrndx];
  for (const s of shdrs) {
    const at = strtab.offset + s.raw.readUInt32LE(0);
    let end = at;
    while (end < b.length && b[end] !== 0) end++;
    s.name = b.subarray(at, end).toString('latin1');
  }
  const removed = new Set(shdrs.filter((s) => s.index !== 0 && !(s.flags & BigInt(SHF_ALLOC)) && removableSection(s.name)).map((s) => s.index));
  if (!removed.size) return undefined;

  // everything the loader maps stays byte for byte where it is
  let cut = 0;
  for (let i = 0; i < phnum; i++) {
    const o = phoff + i * phentsize;
    cut = Math.max(cut, Number(b.readBigUInt64LE(o + 8)) + Number(b.readBigUInt64LE(o + 0x20)));
  }
  cut = Math.max(cut, phoff + phnum * phentsize);
  const firstRemoved = Math.min(...removed);
  for (const s of shdrs) {
    if (s.index === 0) continue;
    const alloc = !!(s.flags & BigInt(SHF_ALLOC));
    if (alloc && s.index > firstRemoved) return undefined; // dynamic symbols name sections by index: do not renumber loaded ones
    if (alloc && s.type !== SHT_NOBITS) cut = Math.max(cut, s.offset + s.size);
  }
  const kept = shdrs.filter((s) => !removed.has(s.index));
  const newIndex = new Map(kept.map((s, i) => [s.index, i]));
  for (const s of kept) {
    if (s.index === 0) continue;
    if (!(s.flags & BigInt(SHF_ALLOC)) && s.type !== SHT_NOBITS && s.offset < cut) return undefined;
    if (s.link && !newIndex.has(s.link)) return undefined;
    if (s.flags & BigInt(SHF_INFO_LINK) && s.info && !newIndex.has(s.info)) return undefined;
  }

  const parts: Buffer[] = [b.subarray(0, cut)];
  let pos = cut;
  for (const s of kept) {
    const h = s.raw;
    if (s.index !== 0 && s.link) h.writeUInt32LE(newIndex.get(s.link)!, 0x28);
    if (s.index !== 0 && s.flags & BigInt(SHF_INFO_LINK) && s.info) h.writeUInt32LE(newIndex.get(s.info)!, 0x2c);
    if (s.index === 0 || s.flags & BigInt(SHF_ALLOC) || s.type === SHT_NOBITS) continue;
    const at = align(pos, s.align);
    if (at > pos) parts.push(Buffer.alloc(at - pos));
    parts.push(b.subarray(s.offset, s.offset + s.size));
    h.writeBigUInt64LE(BigInt(at), 0x18);
    pos = at + s.size;
  }
  const newShoff = align(pos, 8);
  if (newShoff > pos) parts.push(Buffer.alloc(newShoff - pos));
  parts.push(...kept.map((s) => s.raw));
  const out = Buffer.concat(parts);
  out.writeBigUInt64LE(BigInt(newShoff), 0x28);
  out.writeUInt16LE(kept.length, 0x3c);
  out.writeUInt16LE(newIndex.get(shstrndx)!, 0x3e);
  return out;
}
