/**
 * ttrpc's wire framing (github.com/containerd/ttrpc, channel.go): a 10-byte
 * big-endian header (payload length u32, stream id u32, type u8, flags u8)
 * and a payload of at most 4 MiB. Client streams are odd. Pure.
 */
export const HEADER_BYTES = 10;
export const MAX_PAYLOAD = 4 << 20;
export const MessageType = { Request: 1, Response: 2, Data: 3 } as const;

export interface Frame {
  streamId: number;
  type: number;
  flags: number;
  payload: Uint8Array;
}
/** A frame whose payload was over the limit: its bytes were skipped, its stream can still be answered. */
export interface Oversize {
  streamId: number;
  type: number;
  length: number;
}

export function encodeFrame(f: Omit<Frame, 'flags'> & { flags?: number }): Buffer {
  if (f.payload.length > MAX_PAYLOAD) throw new RangeError(`ttrpc payload of ${f.payload.length} bytes is over the ${MAX_PAYLOAD}-byte limit`);
  const b = Buffer.alloc(HEADER_BYTES + f.payload.length);
  b.writeUInt32BE(f.payload.length, 0);
  b.writeUInt32BE(f.streamId >>> 0, 4);
  b.writeUInt8(f.type, 8);
  b.writeUInt8(f.flags ?? 0, 9);
  b.set(f.payload, HEADER_BYTES);
  return b;
}

/** Cuts a byte stream into frames; an oversized payload is skipped as it arrives (never buffered). */
export class FrameReader {
  private buf: Buffer = Buffer.alloc(0);
  private skip?: Oversize & { left: number };

  push(chunk: Uint8Array): (Frame | { oversize: Oversize })[] {
    const out: (Frame | { oversize: Oversize })[] = [];
    let data: Buffer = Buffer.from(chunk.buffer, chunk.byteOffset, chunk.length);
    if (this.skip) {
      const n = Math.min(this.skip.left, data.length);
      this.skip.left -= n;
      data = data.subarray(n);
      if (this.skip.left > 0) return out;
      const { streamId, type, length } = this.skip;
      this.skip = undefined;
      out.push({ oversize: { streamId, type, length } });
    }
    this.buf = this.buf.length ? Buffer.concat([this.buf, data]) : data;
    while (this.buf.length >= HEADER_BYTES) {
      const length = this.buf.readUInt32BE(0),
        streamId = this.buf.readUInt32BE(4),
        type = this.buf.readUInt8(8),
        flags = this.buf.readUInt8(9);
      if (length > MAX_PAYLOAD) {
        const have = Math.min(length, this.buf.length - HEADER_BYTES);
        this.buf = this.buf.subarray(HEADER_BYTES + have);
        if (have === length) {
          out.push({ oversize: { streamId, type, length } });
          continue;
        }
        this.skip = { streamId, type, length, left: length - have };
        break;
      }
      if (this.buf.length < HEADER_BYTES + length) break;
      out.push({ streamId, type, flags, payload: Buffer.from(this.buf.subarray(HEADER_BYTES, HEADER_BYTES + length)) });
      this.buf = this.buf.subarray(HEADER_BYTES + length);
    }
    if (!this.buf.length) this.buf = Buffer.alloc(0);
    else this.buf = Buffer.from(this.buf); // do not pin a large chunk for a few bytes
    return out;
  }
}
