/**
 * What differs between two builds: the first differing entry of two newc
 * initramfs archives and how, or the first differing line of a text output.
 * Pure (the caller decompresses).
 */
import { createHash } from 'node:crypto';

export interface CpioEntry {
  name: string;
  mode: number;
  uid: number;
  gid: number;
  mtime: number;
  size: number;
  rdev: string;
  data: Buffer;
}

export function parseCpio(b: Buffer): CpioEntry[] {
  const out: CpioEntry[] = [];
  let off = 0;
  const field = (o: number, i: number) => parseInt(b.toString('latin1', o + 6 + i * 8, o + 14 + i * 8), 16);
  while (off + 110 <= b.length) {
    const magic = b.toString('latin1', off, off + 6);
    if (magic !== '070701' && magic !== '070702') throw new Error(`not a newc cpio archive at byte ${off}`);
    const mode = field(off, 1),
      uid = field(off, 2),
      gid = field(off, 3),
      mtime = field(off, 5),
      size = field(off, 6);
    const rdev = `${field(off, 9)}:${field(off, 10)}`;
    const nameSize = field(off, 11);
    const name = b.toString('utf8', off + 110, off + 110 + nameSize - 1);
    let dataAt = off + 110 + nameSize;
    dataAt += (4 - (dataAt % 4)) % 4;
    if (name === 'TRAILER!!!') break;
    out.push({ name: '/' + name, mode, uid, gid, mtime, size, rdev, data: b.subarray(dataAt, dataAt + size) });
    off = dataAt + size;
    off += (4 - (off % 4)) % 4;
  }
  return out;
}

const sha = (d: Buffer) => createHash('sha256').update(d).digest('hex').slice(0, 16);
const octal = (m: number) => '0' + m.toString(8);

/** The first entry that differs, in archive order, with what differs about it; undefined when the archives hold the same entries. */
export function firstCpioDifference(a: CpioEntry[], b: CpioEntry[]): { path: string; how: string } | undefined {
  const bNames = new Set(b.map((e) => e.name));
  const aNames = new Set(a.map((e) => e.name));
  for (let i = 0; i < Math.max(a.length, b.length); i++) {
    const x = a[i],
      y = b[i];
    if (x && !bNames.has(x.name)) return { path: x.name, how: 'only in the first build' };
    if (y && !aNames.has(y.name)) return { path: y.name, how: 'only in the second build' };
    if (!x || !y) break;
    if (x.name !== y.name) return { path: x.name, how: `the archives order it differently (position ${i}: ${x.name} vs ${y.name})` };
    if (x.mode !== y.mode) return { path: x.name, how: `mode ${octal(x.mode)} vs ${octal(y.mode)}` };
    if (x.uid !== y.uid || x.gid !== y.gid) return { path: x.name, how: `owner ${x.uid}:${x.gid} vs ${y.uid}:${y.gid}` };
    if (x.mtime !== y.mtime) return { path: x.name, how: `mtime ${x.mtime} vs ${y.mtime} (set SOURCE_DATE_EPOCH)` };
    if (x.rdev !== y.rdev) return { path: x.name, how: `device ${x.rdev} vs ${y.rdev}` };
    if (!x.data.equals(y.data)) {
      let at = 0;
      while (at < Math.min(x.size, y.size) && x.data[at] === y.data[at]) at++;
      const sizes = x.size === y.size ? `${x.size} bytes each` : `${x.size} vs ${y.size} bytes`;
      return { path: x.name, how: `contents differ from byte ${at} (${sizes}; sha256 ${sha(x.data)}… vs ${sha(y.data)}…)` };
    }
  }
  return undefined;
}

/** The first differing line of two text files (1-based), both lines shown. */
export function firstLineDifference(a: string, b: string): { line: number; first: string; second: string } | undefined {
  const la = a.split('\n'),
    lb = b.split('\n');
  for (let i = 0; i < Math.max(la.length, lb.length); i++) {
    if (la[i] !== lb[i]) return { line: i + 1, first: la[i] ?? '(end of file)', second: lb[i] ?? '(end of file)' };
  }
  return undefined;
}
