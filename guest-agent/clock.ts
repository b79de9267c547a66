/**
 * Keeping a clone's clock on the host's.
 *
 * The reference is the emulated RTC, which QEMU drives from the host's wall
 * clock (-rtc clock=host, its default) in clones and across pauses alike.
 * It counts whole seconds, and its seconds tick at a phase of their own
 * (fixed when the template's QEMU started, the same in every clone). So:
 * - once, in the template, the host steps the clock precisely (it measures
 *   the offset over a few round trips and sends it: clock.step) and the
 *   agent measures the RTC's phase against that clock: the moment the RTC's
 *   seconds change, read from sysfs in a short poll around the expected edge;
 * - in a clone, and then at an interval that adapts to the corrections
 *   made, the agent measures again: any change against that phase is the
 *   system clock's own drift, and it is stepped away.
 * Steps are relative (clock_adjtime ADJ_SETOFFSET, via linuxptp's phc_ctl),
 * so the time a process takes to start does not enter the result; busybox
 * `date -s` (whole seconds) only brings a clone's stale clock near at once.
 */
import type { ShellWorker } from './shell.ts';
import { sleep, type Platform, type Timer } from './platform.ts';
import type { ClockInfo } from '../common/agent-protocol.ts';

export const RTC_SECONDS = '/sys/class/rtc/rtc0/since_epoch';
export const PHC_CTL = '/usr/sbin/phc_ctl';

export type { ClockInfo };

/** The next check interval: longer while the drift found is small, shorter when it grows. Pure. */
export function nextInterval(currentMs: number, driftMs: number, bounds = { min: 10_000, max: 120_000 }): number {
  const a = Math.abs(driftMs);
  const n = a < 10 ? currentMs * 2 : a > 30 ? currentMs / 2 : currentMs;
  return Math.min(bounds.max, Math.max(bounds.min, Math.round(n)));
}

/**
 * Whole-second step for `date -s @S` from a time in ms: rounded, not truncated.
 * time.set uses it: a busybox applet is far cheaper to start than phc_ctl right
 * after a pool clone resumes; the keeper refines it against the RTC a second later. Pure.
 */
export function dateStepSeconds(ms: number): number {
  return Math.round(ms / 1000);
}

/**
 * Drift of the system clock from an RTC-edge measurement and the calibrated
 * phase. Not folded modulo a second: the RTC's whole seconds are the host's
 * too, so a clock a second or an hour off is seen as such. Pure.
 */
export function driftFrom(offsetMs: number, phaseMs: number): number {
  return offsetMs - phaseMs;
}

/** How precisely an RTC edge must be seen to be trusted (ms between the last read of the old second and the first of the new). */
export const EDGE_UNCERTAINTY_MS = 5;
/** How many times calibration looks for a trustworthy RTC edge before it reports that it found none. */
export const CALIBRATE_ATTEMPTS = 4;
/** How many times a keeper's check looks for one (an error then waits for the next check). */
export const CHECK_ATTEMPTS = 2;

/**
 * The system clock minus the RTC at an edge seen between two reads (the
 * old second read at `before`, the new one, `seconds`, at `now`): undefined
 * when the two reads are too far apart to place the edge, as when the guest
 * was not scheduled between them (a clone among many on a loaded host): a
 * late sighting would pass for the clock running ahead, and the keeper would
 * step it back by that much (seen: 3 s under 4 concurrent forks). Pure.
 */
export function edgeOffset(before: number, now: number, seconds: number, maxUncertaintyMs = EDGE_UNCERTAINTY_MS): number | undefined {
  return now - before <= maxUncertaintyMs ? now - seconds * 1000 : undefined;
}

/** `phc_ctl` argument for a relative step of `ms` milliseconds. Pure. */
export function phcStepArgs(ms: number): string {
  // "--": a negative step would otherwise read as an option
  return `${PHC_CTL} -q -Q -- CLOCK_REALTIME adj ${(ms / 1000).toFixed(6)}`;
}

export class ClockKeeper {
  private timer?: Timer;
  private busy?: Promise<number>;
  readonly state: ClockInfo;

  constructor(
    private readonly platform: Platform,
    private readonly shell: ShellWorker,
    readonly enabled: boolean,
    private readonly rtcFile = RTC_SECONDS,
  ) {
    this.state = { source: enabled ? 'rtc' : 'off', checks: 0, steps: 0, intervalMs: 10_000 };
  }

  private readRtc(): number {
    return Number(this.platform.readText(this.rtcFile));
  }

  /**
   * ms between the RTC's second edge and the system clock at that edge
   * (system - RTC). Polls tightly only for a few tens of ms around an edge
   * whose time it knows: from the phase when the clock is near right, else
   * from a coarse poll (every 10 ms) of one edge first.
   */
  async rtcOffset(): Promise<number> {
    const phase = this.state.rtcPhaseMs;
    if (phase !== undefined) {
      const fine = await this.pollEdge(this.untilNext(phase - 60), 150);
      if (fine !== undefined) return fine;
    }
    // coarse: find an edge within ~10 ms, then catch the next one tightly
    const first = this.readRtc();
    const end = Date.now() + 1500;
    let s = first;
    while (s === first) {
      if (Date.now() > end) throw new Error(`the RTC (${this.rtcFile}) did not tick within 1.5 s`);
      await sleep(this.platform, 10);
      s = this.readRtc();
    }
    const edge = Date.now();
    const fine = await this.pollEdge(Math.max(0, edge + 1000 - 60 - Date.now()), 150);
    if (fine === undefined) throw new Error(`the RTC (${this.rtcFile}) did not tick when expected`);
    return fine;
  }

  /** ms from now until the system clock next reads `phase` modulo a second. */
  private untilNext(phase: number): number {
    return (((phase - Date.now()) % 1000) + 1000) % 1000;
  }

  /** Sleep `waitMs`, then read the RTC in a tight loop for at most `windowMs`; the offset at the edge, if one came. */
  private async pollEdge(waitMs: number, windowMs: number): Promise<number | undefined> {
    await sleep(this.platform, waitMs);
    const first = this.readRtc();
    let before = Date.now();
    const end = before + windowMs;
    for (;;) {
      const s = this.readRtc();
      const now = Date.now();
      if (s !== first) return edgeOffset(before, now, s);
      if (now > end) return undefined;
      before = now;
    }
  }

  /** Step the system clock by `ms` (relative, so process start-up time does not matter). */
  async step(ms: number): Promise<void> {
    const r = await this.shell.run(phcStepArgs(ms));
    if (r.code !== 0) throw new Error(`phc_ctl failed (exit ${r.code}): ${r.output.trim().slice(-300)}`);
    this.state.steps++;
  }

  /**
   * The system clock is right now (the host just stepped it): remember the
   * RTC's phase against it. An edge seen too late to trust (the guest not
   * scheduled around it, as on a loaded host) is looked for again, up to
   * `attempts` times (each within ~2.7 s); if none can be trusted, the phase
   * stays unknown and the reason is in state.lastError: the keeper then
   * leaves the clock alone (as when it is off) rather than fail a boot.
   */
  async calibrate(attempts = CALIBRATE_ATTEMPTS): Promise<number | undefined> {
    this.state.rtcPhaseMs = undefined;
    try {
      this.state.rtcPhaseMs = await this.trustedOffset(attempts);
      this.state.lastError = undefined;
      return this.state.rtcPhaseMs;
    } catch (e) {
      this.state.lastError = `RTC phase not calibrated: ${(e as Error).message}`;
      return undefined;
    }
  }

  /** rtcOffset, looked for again while the edges seen cannot be trusted, at most `attempts` times. */
  private async trustedOffset(attempts: number): Promise<number> {
    let last: Error | undefined;
    for (let i = 0; i < attempts; i++) {
      try {
        return await this.rtcOffset();
      } catch (e) {
        last = e as Error;
      }
    }
    throw new Error(`${last?.message} (${attempts} attempts)`);
  }

  /** Measure the drift against the RTC and step it away if it is over 5 ms; resolves with the drift found. */
  check(): Promise<number> {
    if (!this.enabled || this.state.rtcPhaseMs === undefined) return Promise.resolve(0);
    this.busy ??= (async () => {
      // a check that sees only late edges (a loaded host) looks again before it gives up until the next interval
      const drift = driftFrom(await this.trustedOffset(CHECK_ATTEMPTS), this.state.rtcPhaseMs!);
      this.state.checks++;
      this.state.lastCheckAt = Date.now();
      this.state.lastDriftMs = Math.round(drift * 10) / 10;
      if (Math.abs(drift) > 5) await this.step(-drift);
      this.state.lastError = undefined;
      return drift;
    })()
      .catch((e) => {
        this.state.lastError = (e as Error).message;
        throw e;
      })
      .finally(() => {
        this.busy = undefined;
      });
    return this.busy;
  }

  /** Check after `delayMs` (after a fork or a resume) and then keep checking at the adaptive interval. */
  kick(delayMs = 0): void {
    if (!this.enabled) return;
    this.platform.clearTimeout(this.timer);
    this.state.intervalMs = 10_000;
    const go = () =>
      this.check()
        .then(
          () => undefined,
          () => undefined,
        )
        .finally(() => this.schedule()); // errors are kept in state.lastError for info
    if (delayMs) this.timer = this.platform.setTimeout(go, delayMs);
    else void go();
  }

  private schedule(): void {
    this.platform.clearTimeout(this.timer);
    this.timer = this.platform.setTimeout(async () => {
      try {
        this.state.intervalMs = nextInterval(this.state.intervalMs, await this.check());
      } catch {
        // kept in state.lastError; the next attempt comes at the same interval
      }
      this.schedule();
    }, this.state.intervalMs);
  }

  stop(): void {
    this.platform.clearTimeout(this.timer);
  }

  /**
   * Stop, and wait for a check under way: before a template is frozen. A
   * check frozen half-way would go on in every clone with readings from
   * before the freeze (an RTC second and a clock time the fork has made
   * stale) and could step the clone's clock by the template's age; each
   * clone's keeper starts afresh from its identity instead.
   */
  async settle(): Promise<void> {
    this.stop();
    await this.busy?.catch(() => undefined); // its error is in state.lastError
    this.stop(); // a check that ended meanwhile scheduled the next one
  }
}
