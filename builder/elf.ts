/** Just enough ELF64 (little-endian) reading for the guest: DT_NEEDED, PT_INTERP, and a named section. Pure. */

export function isElf(b: Buffer): boolean {
  return b.length > 64 && b[0] === 0x7f && b[1] === 0x45 && b[2] === 0x4c && b[3] === 0x46;
}

interface Section {
  name: string;
  type: number;
  offset: number;
  size: number;
  addr: number;
  link: number;
}

function sections(b: Buffer): Section[] {
  const shoff = Number(b.readBigUInt64LE(0x28));
  const shentsize = b.readUInt16LE(0x3a);
  const shnum = b.readUInt16LE(0x3c);
  const shstrndx = b.readUInt16LE(0x3e);
  if (!shoff || shoff + shnum * shentsize > b.length) return [];
  const raw = Array.from({ length: shnum }, (_, i) => {
    const o = shoff + i * shentsize;
    return {
      nameOff: b.readUInt32LE(o),
      type: b.readUInt32LE(o + 4),
      addr: Number(b.readBigUInt64LE(o + 0x10)),
      offset: Number(b.readBigUInt64LE(o + 0x18)),
      size: Number(b.readBigUInt64LE(o + 0x20)),
      link: b.readUInt32LE(o + 0x28),
    };
  });
  const strtab = raw[shstrndx];
  return raw.map((s) => ({ ...s, name: strtab ? cstr(b, strtab.offset + s.nameOff) : '' }));
}

function cstr(b: Buffer, off: number): string {
  let end = off;
  while (end < b.length && b[end] !== 0) end++;
  return b.subarray(off, end).toString('latin1');
}

export function elfSection(b: Buffer, name: string): Buffer | undefined {
  if (!isElf(b) || b[4] !== 2) return undefined;
  const s = sections(b).find((x) => x.name === name);
  return s ? b.subarray(s.offset, s.offset + s.size) : undefined;
}

export interface ElfDeps {
  interp?: string;
  needed: string[];
}

/** Program interpreter and DT_NEEDED entries (read through the program headers, so stripped files work). */
export function elfDeps(b: Buffer): ElfDeps {
  if (!isElf(b) || b[4] !== 2 || b[5] !== 1) return { needed: [] };
  const phoff = Number(b.readBigUInt64LE(0x20));
  const phentsize = b.readUInt16LE(0x36);
  const phnum = b.readUInt16LE(0x38);
  const phs = Array.from({ length: phnum }, (_, i) => {
    const o = phoff + i * phentsize;
    return {
      type: b.readUInt32LE(o),
      offset: Number(b.readBigUInt64LE(o + 8)),
      vaddr: Number(b.readBigUInt64LE(o + 0x10)),
      filesz: Number(b.readBigUInt64LE(o + 0x20)),
    };
  });
  const out: ElfDeps = { needed: [] };
  const interp = phs.find((p) => p.type === 3);
  if (interp) out.interp = cstr(b, interp.offset);
  const dyn = phs.find((p) => p.type === 2);
  if (!dyn) return out;
  const vaddrToOff = (va: number) => {
    const load = phs.find((p) => p.type === 1 && va >= p.vaddr && va < p.vaddr + p.filesz);
    return load ? va - load.vaddr + load.offset : -1;
  };
  const needed: number[] = [];
  let strtab = -1;
  for (let o = dyn.offset; o + 16 <= dyn.offset + dyn.filesz; o += 16) {
    const tag = Number(b.readBigInt64LE(o));
    const val = Number(b.readBigUInt64LE(o + 8));
    if (tag === 0) break;
    if (tag === 1) needed.push(val);
    if (tag === 5) strtab = vaddrToOff(val);
  }
  if (strtab >= 0) out.needed = needed.map((n) => cstr(b, strtab + n));
  return out;
}

/** The `depends=` list from a kernel module's .modinfo section. */
export function moduleDepends(ko: Buffer): string[] {
  const mi = elfSection(ko, '.modinfo');
  if (!mi) return [];
  for (const kv of mi.toString('latin1').split('\0')) {
    if (kv.startsWith('depends=')) return kv.slice(8).split(',').filter(Boolean);
  }
  return [];
}
