/** Digests as scion writes them: hex SHA-256, OCI `sha256:<hex>`, and the hex inside an npm integrity string. Pure. */
import { createHash } from 'node:crypto';

export const sha256 = (b: Uint8Array | string) => createHash('sha256').update(b).digest('hex');
export const ociDigest = (b: Uint8Array | string) => `sha256:${sha256(b)}`;
/** `sha512-<base64>` (npm's dist.integrity) -> hex */
export const integrityHex = (integrity: string) => Buffer.from(integrity.replace(/^sha512-/, ''), 'base64').toString('hex');
