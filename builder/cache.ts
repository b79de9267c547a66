/**
 * Content-addressed cache under $XDG_CACHE_HOME/scion (default ~/.cache/scion).
 * Blobs are named by their SHA-256 and written to a unique temporary file
 * then renamed, so two builds that fetch the same blob at once both end with
 * one complete copy and never read a half-written one. A blob whose bytes do
 * not match its name is deleted and treated as missing (never used).
 */
import { readFile, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { config } from '../common/config.ts';
import { atomicWrite } from '../common/safe-fs.ts';
import { sha256 } from '../common/digest.ts';

export class BlobCache {
  constructor(readonly dir: string = config().cacheDir) {}

  pathOf(hash: string): string {
    return join(this.dir, 'blobs', 'sha256', hash.slice(0, 2), hash);
  }

  /** The blob's bytes, or undefined if absent or corrupt (a corrupt one is removed). */
  async get(hash: string): Promise<Buffer | undefined> {
    let data: Buffer;
    try {
      data = await readFile(this.pathOf(hash));
    } catch {
      return undefined;
    }
    if (sha256(data) !== hash) {
      this.corrupt.push(hash);
      await unlink(this.pathOf(hash)).catch(() => undefined); // another build removed the bad blob first
      return undefined;
    }
    return data;
  }

  /** hashes found corrupt in this process (reported by the build) */
  readonly corrupt: string[] = [];

  async put(data: Uint8Array): Promise<string> {
    const hash = sha256(data);
    await atomicWrite(this.pathOf(hash), data, 0o644, { makeDirs: true });
    return hash;
  }

  /** Named, mutable entries (e.g. the last good InRelease of a mirror). */
  refPath(key: string): string {
    return join(this.dir, 'refs', key.replace(/[^A-Za-z0-9._-]+/g, '_'));
  }
}
