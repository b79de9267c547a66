/**
 * The host's side of a guest's clock: estimate its offset over a few round
 * trips (NTP-style: the sample with the shortest round trip bounds the
 * error by half of it) and step it by exactly that. Done once per template,
 * before the freeze; the agent then keeps every clone on the RTC (see
 * guest-agent/clock.ts).
 */
import type { AgentClient } from '../agent-client.ts';

export interface OffsetSample {
  sentMs: number;
  guestMs: number;
  receivedMs: number;
}

/** The guest clock's offset (ms, + = ahead of the host) and its error bound, from the best sample. Pure. */
export function estimateOffset(samples: OffsetSample[]): { offsetMs: number; errorMs: number } {
  if (!samples.length) throw new Error('no samples');
  const best = samples.reduce((a, b) => (b.receivedMs - b.sentMs < a.receivedMs - a.sentMs ? b : a));
  const rtt = best.receivedMs - best.sentMs;
  return { offsetMs: best.guestMs - (best.sentMs + best.receivedMs) / 2, errorMs: rtt / 2 };
}

export async function measureOffset(agent: AgentClient, n = 5): Promise<{ offsetMs: number; errorMs: number }> {
  const samples: OffsetSample[] = [];
  for (let i = 0; i < n; i++) {
    const sentMs = Date.now();
    const r = await agent.call('ping');
    samples.push({ sentMs, guestMs: r.time, receivedMs: Date.now() });
  }
  return estimateOffset(samples);
}

/** Step the guest's clock onto the host's and have the agent calibrate its RTC reference against it. */
/**
 * Step the guest's clock onto the host's and have the agent calibrate its RTC
 * reference against it. A calibration the guest could not trust (a loaded
 * host) is reported in `calibrationError`, not thrown: the template is still
 * good, its clones only lack the RTC keeper.
 */
export async function syncGuestClock(
  agent: AgentClient,
): Promise<{ offsetMs: number; errorMs: number; after: { offsetMs: number; errorMs: number }; calibrationError?: string }> {
  const before = await measureOffset(agent);
  const r = await agent.call('clock.step', { deltaMs: -before.offsetMs }, 30_000);
  const calibrationError = r.calibrated === false ? (r.clock.lastError ?? 'no RTC edge could be trusted') : undefined;
  return { ...before, after: await measureOffset(agent), calibrationError };
}

/**
 * A clone reports ready only with its clock within 100 ms of the host's. The
 * agent stepped it when the identity arrived, by the host's time in it; but
 * under TCG a freshly forked guest's clock then falls behind while it works
 * through its first second (measured: 20-76 ms behind at the answer, four
 * forks in a row on an idle host; more under load). Its answer carries its
 * clock: within CLOCK_READY_MS of the moment the answer came (the return trip
 * only makes it look further behind), nothing more is done; otherwise the
 * offset is measured over a few round trips and stepped away (~75 ms: a
 * phc_ctl exec in the guest). The clock keeper holds it to a few ms a second
 * later either way. Returns the ms spent.
 */
export const CLOCK_READY_MS = 80;
export async function clockRightAtReady(agent: AgentClient, guestMs: number, receivedMs: number): Promise<number> {
  if (Math.abs(guestMs - receivedMs) <= CLOCK_READY_MS) return 0;
  const t0 = performance.now();
  const off = await measureOffset(agent, 3);
  if (Math.abs(off.offsetMs) > off.errorMs + 5) await agent.call('clock.step', { deltaMs: -off.offsetMs, calibrate: false }, 30_000);
  return Math.round(performance.now() - t0);
}

/**
 * A resumed VM's clock (it stood still while the VM slept): the offset
 * measured over a few round trips and stepped away without recalibrating
 * against the RTC (the keeper does that on its next tick). Returns the
 * offset found and the one left.
 */
export async function stepClockToHost(agent: AgentClient): Promise<{ offsetMs: number; afterMs: number }> {
  const off = await measureOffset(agent, 3);
  if (Math.abs(off.offsetMs) > off.errorMs + 5) await agent.call('clock.step', { deltaMs: -off.offsetMs, calibrate: false }, 30_000);
  const after = await measureOffset(agent, 3);
  return { offsetMs: off.offsetMs, afterMs: after.offsetMs };
}
