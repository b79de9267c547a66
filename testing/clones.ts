/**
 * Running clones of an image for a test: build (cached), boot a template of
 * the test's own, freeze it, fork N clones, and hand out small handles
 * (exec, http, info, call). Everything made is owned by this process; a
 * detached watchdog (reaper.ts) removes it if this process dies before
 * `close()` (a failed run, Ctrl-C, SIGKILL), so no QEMU or run directory
 * outlives the test run. Free of vitest: index.ts wraps it in fixtures.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import {
  resolveImage,
  loadImage,
  bootTemplate,
  freeze,
  fork,
  removeVm,
  connectAgent,
  type BuildEvent,
  type CloneResult,
  type AgentClient,
} from '../host/index.ts';
import { ScionError } from '../common/errors.ts';
import { templateName } from '../common/names.ts';
import type { AgentCommand, AgentInfo, ArgsOf, ResultOf } from '../common/agent-protocol.ts';

export interface ClonesOptions {
  /** the image definition (YAML), a built image directory (out/<name>) or an OCI reference (pulled into the cache) */
  image: string;
  /** how many clones (default 2) */
  count?: number;
  /** where a definition is built (default ./out) */
  outDir?: string;
  /** progress lines (default: none) */
  log?: (line: string) => void;
  onBuildEvent?: (e: BuildEvent) => void;
  /**
   * Fork without re-identifying the clones (they keep the template's hostname,
   * machine-id, addresses and RNG). Exists to show that identity tests catch
   * a broken identity; never use it otherwise.
   */
  skipIdentityApply?: boolean;
}

export interface ExecResult {
  exitCode: number;
  stdout: string;
  stderr: string;
}
export interface HttpResult {
  status: number;
  headers: Record<string, string>;
  body: string;
}

export class TestClone {
  #agent?: AgentClient;
  constructor(readonly vm: CloneResult) {}
  get name() {
    return this.vm.name;
  }
  /** what the host assigned; the tests' point is to check the guest agrees */
  get assigned() {
    return { hostname: this.vm.hostname, mac: this.vm.mac, ip: this.vm.ip, machineId: this.vm.machineId };
  }
  /** guest port -> host port (user-mode networking forwards them to 127.0.0.1) */
  get ports() {
    return this.vm.ports;
  }

  /** Any agent call (guest-agent/PROTOCOL.md), typed by the protocol map: `call('containers.logs', { name: 'web' })`. */
  async call<C extends AgentCommand>(method: C, params?: ArgsOf<C>, timeoutMs = 60_000): Promise<ResultOf<C>> {
    this.#agent ??= await connectAgent(this.vm.name);
    return (this.#agent.call as (m: C, a: ArgsOf<C> | undefined, t: number) => Promise<ResultOf<C>>)(method, params, timeoutMs);
  }
  /** The agent's info: identity, generation, containers. */
  info(): Promise<AgentInfo> {
    return this.call('info');
  }
  /** Run a command in the guest (the image must allow exec); a string runs through /bin/sh -c. */
  exec(cmd: string | string[]): Promise<ExecResult> {
    return this.call('exec', { argv: typeof cmd === 'string' ? ['/bin/sh', '-c', cmd] : cmd });
  }
  /** An HTTP request to a guest port (default: the image's first port), through its forwarded host port. */
  async http(path = '/', o: { port?: number; method?: string; body?: string; headers?: Record<string, string>; timeoutMs?: number } = {}): Promise<HttpResult> {
    const guestPort = String(o.port ?? Object.keys(this.vm.ports)[0]);
    const hostPort = this.vm.ports[guestPort];
    if (!hostPort)
      throw new ScionError('E_NO_PORT', `${this.vm.name} forwards no guest port ${guestPort}`, {
        hint: `ports: ${Object.keys(this.vm.ports).join(', ') || 'none (does the image list ports?)'}`,
      });
    const res = await fetch(`http://127.0.0.1:${hostPort}${path.startsWith('/') ? path : '/' + path}`, {
      method: o.method,
      body: o.body,
      headers: o.headers,
      signal: AbortSignal.timeout(o.timeoutMs ?? 30_000),
    });
    return { status: res.status, headers: Object.fromEntries(res.headers), body: await res.text() };
  }
  close(): void {
    this.#agent?.close();
    this.#agent = undefined;
  }
}

export interface CloneSet {
  clones: TestClone[];
  template: string;
  /** Remove the clones and the template (idempotent). */
  close(): Promise<void>;
}

/** The watchdog: a detached process that removes what we own once we are gone. */
function startReaper(): { stop(): void } {
  const here = fileURLToPath(new URL('.', import.meta.url));
  const js = `${here}reaper.js`;
  const ts = `${here}reaper.ts`;
  // a checkout runs the source through tsx (resolved from here, not from the caller's working directory)
  const args = existsSync(js) ? [js] : ['--import', import.meta.resolve('tsx'), ts];
  const child = spawn(process.execPath, [...args, String(process.pid)], { detached: true, stdio: 'ignore', env: process.env });
  child.unref();
  return {
    stop: () => {
      try {
        process.kill(child.pid!, 'SIGTERM');
      } catch {
        /* already gone */
      }
    },
  };
}

export async function startClones(opts: ClonesOptions): Promise<CloneSet> {
  const log = opts.log ?? (() => undefined);
  const count = opts.count ?? 2;
  if (!Number.isInteger(count) || count < 1 || count > 64) throw new ScionError('E_USAGE', `count ${count}: use 1 to 64 clones`);
  const { dir } = await resolveImage(opts.image, { outDir: opts.outDir, onBuildEvent: opts.onBuildEvent, log });
  const img = await loadImage(dir);
  const owner = { pid: process.pid, kind: 'test' };
  // a template of our own: parallel test files and other scion users never share or remove it
  const template = templateName(`t${randomBytes(3).toString('hex')}-${img.name.slice(0, 40)}`);
  const reaper = startReaper();
  const made: string[] = [template];
  const clones: TestClone[] = [];
  let closed = false;
  const close = async () => {
    if (closed) return;
    closed = true;
    for (const c of clones) c.close();
    const errors: string[] = [];
    for (const n of made.reverse()) await removeVm(n, { force: true }).catch((e) => errors.push(`${n}: ${(e as Error).message}`));
    reaper.stop();
    if (errors.length) throw new ScionError('E_CLEANUP', `could not remove: ${errors.join('; ')}`, { hint: 'scion gc removes what is left' });
  };
  try {
    log(`booting template ${template}`);
    const h = await bootTemplate(img, { name: template, owner, log });
    await freeze(h, img, log);
    log(`forking ${count} clone(s)`);
    const vms = await fork(template, { n: count, owner, skipIdentityApply: opts.skipIdentityApply, log });
    for (const v of vms) {
      made.push(v.name);
      clones.push(new TestClone(v));
    }
    return { clones, template, close };
  } catch (e) {
    await close().catch(() => undefined); // the failure to start is the error worth reporting; the reaper and gc handle leftovers
    throw e;
  }
}
