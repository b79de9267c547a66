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
