/** Digests as scion writes them: hex SHA-256 and OCI `sha256:<hex>`. Pure. */
import { createHash } from 'node:crypto';

export const sha256 = (b: Uint8Array | string) => createHash('sha256').update(b).digest('hex');
export const ociDigest = (b: Uint8Array | string) => `sha256:${sha256(b)}`;
