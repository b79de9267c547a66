/**
 * One session of the agent protocol on a transport (PROTOCOL.md "Framing",
 * "Resynchronisation handshake", "Flow control"), apart from what the
 * commands do (agent.ts).
 */
import { FrameDecoder, encodeFrame, concatBytes, RESYNC_BYTE } from '../common/framing.ts';
import type { Transport } from './platform.ts';
import { MAX_FRAME, ProtocolError, parseRequest, salvageId, type Request } from './protocol.ts';

/**
 * Requests read but not yet answered, at most: past this the session stops
 * reading until answers have gone out, so a client that pipelines without
 * end meets backpressure instead of lost answers or an agent that grows.
 */
export const MAX_IN_FLIGHT = 64;

/**
 * Serve the protocol on one transport: frames decoded (an oversized one
 * answered with E_FRAME_TOO_LARGE, the stream resynchronised after the 0xff
 * marker), each request handed to `handle` and answered in its own time,
 * reading paused while MAX_IN_FLIGHT requests wait or the transport is backed
 * up. Returns the session's sender, for the agent's events.
 */
export function attachSession(t: Transport, handle: (req: Request) => Promise<unknown>): (msg: unknown) => void {
  const decoder = new FrameDecoder(MAX_FRAME);
  let resyncPending = false;
  // reading stops while too many requests wait for their answer or the stream is backed up
  let inFlight = 0;
  let backedUp = false;
  let paused = false;
  const flow = () => {
    const stop = inFlight >= MAX_IN_FLIGHT || backedUp;
    if (stop && !paused) {
      paused = true;
      t.pause?.();
    } else if (!stop && paused) {
      paused = false;
      t.resume?.();
    }
  };
  t.onDrain?.(() => {
    backedUp = false;
    flow();
  });
  const send = (msg: unknown, marker = false) => {
    try {
      const ok = t.write(marker ? concatBytes([Uint8Array.of(RESYNC_BYTE), encodeFrame(msg)]) : encodeFrame(msg));
      if (ok === false) {
        backedUp = true;
        flow();
      }
    } catch {
      /* the host went away mid-write: the session closes and the host resyncs on reconnect */
    }
  };
  const answered = () => {
    inFlight--;
    flow();
  };
  t.onData((chunk) => {
    let evs: ReturnType<typeof decoder.push>;
    try {
      evs = decoder.push(chunk);
    } catch {
      return;
    }
    for (const ev of evs) {
      if ('resync' in ev) {
        resyncPending = true;
        continue;
      }
      if ('oversize' in ev) {
        send({ id: null, ok: false, error: { code: 'E_FRAME_TOO_LARGE', message: `frame of ${ev.oversize} bytes exceeds the ${MAX_FRAME}-byte limit` } });
        continue;
      }
      let req: Request;
      try {
        req = parseRequest(ev.frame);
      } catch (e) {
        const pe = e as ProtocolError;
        send({ id: salvageId(ev.frame), ok: false, error: { code: pe.code ?? 'E_BAD_REQUEST', message: pe.message } });
        continue;
      }
      const marker = resyncPending && req.cmd === 'sync';
      if (req.cmd === 'sync') resyncPending = false;
      inFlight++;
      handle(req)
        .then(
          (result) => send({ id: req.id, ok: true, result }, marker),
          (err) => {
            const code = err instanceof ProtocolError ? err.code : 'E_INTERNAL';
            send({ id: req.id, ok: false, error: { code, message: String(err?.message ?? err).slice(0, 2000) } }, marker);
          },
        )
        .finally(answered);
    }
    flow();
  });
  return (m: unknown) => send(m);
}
