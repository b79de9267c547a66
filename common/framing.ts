/**
 * Newline-delimited JSON framing shared by the agent protocol and QMP.
 * Bounded: a frame longer than maxFrame is dropped (reported once) and the
 * decoder skips to the next newline, so a peer cannot make it grow without
 * end. The byte 0xFF (never valid in UTF-8 JSON) is a resync marker: any
 * partial frame before it is discarded, as in qemu-guest-agent's
 * guest-sync-delimited. Bytes are Uint8Array (a Buffer is one): the guest
 * agent runs on QuickJS, which has no Buffer.
 */
import { utf8Decode, utf8Encode } from './utf8.ts';

export const RESYNC_BYTE = 0xff;
export const DEFAULT_MAX_FRAME = 1 << 20;

export type FrameEvent = { frame: string } | { oversize: number } | { resync: true };

export function concatBytes(parts: Uint8Array[]): Uint8Array {
  if (parts.length === 1) return parts[0];
  let n = 0;
  for (const p of parts) n += p.length;
  const out = new Uint8Array(n);
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

export class FrameDecoder {
  private parts: Uint8Array[] = [];
  private size = 0;
  private skipping = false;
  constructor(readonly maxFrame = DEFAULT_MAX_FRAME) {}

  push(chunk: Uint8Array): FrameEvent[] {
    const out: FrameEvent[] = [];
    let start = 0;
    // the next newline or resync byte by indexOf (the engine's native search: a JS loop over every
    // byte is what the agent on QuickJS under TCG paid ~1.5 ms a KB for)
    let nl = chunk.indexOf(0x0a),
      rs = chunk.indexOf(RESYNC_BYTE);
    for (;;) {
      if (nl < start && nl !== -1) nl = chunk.indexOf(0x0a, start);
      if (rs < start && rs !== -1) rs = chunk.indexOf(RESYNC_BYTE, start);
      const i = nl === -1 ? rs : rs === -1 ? nl : Math.min(nl, rs);
      if (i === -1) break;
      const b = chunk[i];
      const piece = chunk.subarray(start, i);
      start = i + 1;
      if (b === RESYNC_BYTE) {
        this.parts = [];
        this.size = 0;
        this.skipping = false;
        out.push({ resync: true });
        continue;
      }
      if (this.skipping) {
        this.skipping = false;
        this.parts = [];
        this.size = 0;
        continue;
      }
      if (this.size + piece.length > this.maxFrame) {
        out.push({ oversize: this.size + piece.length });
        this.parts = [];
        this.size = 0;
        continue;
      }
      const line = utf8Decode(concatBytes([...this.parts, piece])).replace(/\r$/, '');
      this.parts = [];
      this.size = 0;
      if (line.trim()) out.push({ frame: line });
    }
    if (start < chunk.length && !this.skipping) {
      const rest = chunk.subarray(start);
      if (this.size + rest.length > this.maxFrame) {
        out.push({ oversize: this.size + rest.length });
        this.parts = [];
        this.size = 0;
        this.skipping = true;
      } else {
        this.parts.push(rest.slice());
        this.size += rest.length;
      }
    }
    return out;
  }
}

export function encodeFrame(msg: unknown): Uint8Array {
  return utf8Encode(JSON.stringify(msg) + '\n');
}
