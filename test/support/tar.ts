/** Tar archives for tests (tar-stream). */
import tar from 'tar-stream';

/** A tar archive of `entries` (epoch mtimes; a directory 0755 and anything else 0644 unless `mode` says), as OCI layers and archives are. */
export async function tarOf(
  entries: { name: string; data?: Buffer | string; linkname?: string; mode?: number; type?: 'file' | 'symlink' | 'directory' }[],
): Promise<Buffer> {
  const pack = tar.pack();
  const chunks: Buffer[] = [];
  pack.on('data', (c: unknown) => chunks.push(c as Buffer));
  const done = new Promise<void>((r) => pack.on('end', () => r()));
  for (const e of entries) {
    const header = { name: e.name, type: e.type ?? 'file', mode: e.mode ?? (e.type === 'directory' ? 0o755 : 0o644), linkname: e.linkname, mtime: new Date(0) };
    await new Promise<void>((res, rej) => {
      if (header.type === 'file') pack.entry(header, e.data ?? Buffer.alloc(0), (err) => (err ? rej(err) : res()));
      else {
        pack.entry(header);
        res();
      }
    });
  }
  pack.finalize();
  await done;
  return Buffer.concat(chunks);
}
