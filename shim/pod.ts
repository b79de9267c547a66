/**
 * The pod's VM, as a shim gets and keeps it: out of the node's pool, forked
 * from its template, or booted cold (annotation io.scion.boot); the template
 * from the pod's annotations (or made from the image one names); the pool
 * refilled off the pod's path; everything handed back when the shim goes.
 * Also what a bundle says of its VM (VM_FILE), for `delete` after a crash.
 */
import { randomBytes } from 'node:crypto';
import { Machine, loadImage, type AgentClient } from '../host/runtime.ts';
import { TtrpcError, Code } from './ttrpc.ts';
import type { DnsConfig } from '../common/contracts.ts';
import type { AgentEvent } from '../common/agent-protocol.ts';
import { TEMPLATE_ANNOTATION, IMAGE_ANNOTATION, BOOT_ANNOTATION, BOOT_MODES, bootMode, imageAllowed } from './kinds.ts';
import { config } from '../common/config.ts';
import { templateName } from '../common/names.ts';

/**
 * The file in a bundle naming the pod's VM, for `delete` after the shim is
 * gone: its name and its VM generation ID. Names are reused once a VM is
 * removed (a pooled VM may carry a gone pod's name), so `delete` removes a VM
 * only if its generation ID is the one written here.
 */
export const VM_FILE = 'scion-vm';

/** The VM_FILE line for a VM. Pure. */
export const vmFileLine = (name: string, vmgenid: string | undefined): string => `${name} ${vmgenid ?? '-'}\n`;

/** The VM name and generation ID a VM_FILE names; undefined if it is not such a line. Pure. */
export function parseVmFile(text: string): { name: string; vmgenid?: string } | undefined {
  const m = /^([a-z0-9][a-z0-9-]{0,62})(?: ([0-9a-f-]{36}|-))?\n?$/.exec(text);
  return m ? { name: m[1], vmgenid: m[2] && m[2] !== '-' ? m[2] : undefined } : undefined;
}
/** The agent protocol a pod's VM must speak: 2 brought task stdio on ports of their own. */
const TASK_PROTOCOL = 2;

/** How long after its pod's VM is made a shim refills the pool if no container has started by then. */
const REFILL_AFTER_MS = 5000;
/** How long after the pod's first container started the pool is refilled (a fork takes the cores the container starts on). */
const REFILL_DELAY_MS = 1000;

export interface PodVmOptions {
  /** the shim's default template (SCION_SHIM_TEMPLATE) */
  template: string;
  log: (m: string) => void;
  /** the agent's events (task exits) */
  onEvent: (e: AgentEvent) => void;
  /** the VM went away under the pod (its QEMU killed, or removed) */
  onGone: () => void;
  /** told when a pool refill ends (the shim may have become idle) */
  onIdleChange?: () => void;
}

export class PodVm {
  machine?: Machine;
  agent?: AgentClient;
  private forking?: Promise<Machine>;

  constructor(private readonly o: PodVmOptions) {}

  /** Whether it is making the pod's VM or refilling the pool now. */
  busy(): boolean {
    return !!this.forking || !!this.filling;
  }

  /** The pod's first container started: the pool is refilled a little after, not while it starts serving. */
  containerStarted(): void {
    if (this.poolTemplate) this.refillIn(REFILL_DELAY_MS);
  }

  /**
   * The template a pod forks from: one made from the image its annotation
   * names (pulled, booted with a tap, frozen: once per node and image, named
   * after the image's manifest), else the one its annotation names, else the
   * shim's default.
   */
  private async templateFor(annotations: Record<string, string>): Promise<string> {
    const ref = annotations[IMAGE_ANNOTATION];
    if (!ref) {
      const named = annotations[TEMPLATE_ANNOTATION] ?? this.o.template;
      return named.includes('/') ? this.snapshotTemplate(named) : named;
    }
    if (annotations[TEMPLATE_ANNOTATION])
      throw new TtrpcError(Code.INVALID_ARGUMENT, `the annotations ${IMAGE_ANNOTATION} and ${TEMPLATE_ANNOTATION} name a pod's template two ways: keep one`);
    const allowed = config().shimImagePrefixes;
    if (!imageAllowed(ref, allowed))
      throw new TtrpcError(
        Code.PERMISSION_DENIED,
        `${IMAGE_ANNOTATION}: ${ref} is not under a reference this node allows (SCION_SHIM_IMAGES: ${allowed.length ? allowed.join(', ') : 'unset, so none'}); add its registry/repository prefix to SCION_SHIM_IMAGES in containerd's environment`,
      );
    // loaded only here: pulling and booting bring in what a fork does not need
    const { ensureTemplate } = await import('../host/index.ts');
    try {
      const t = await ensureTemplate(ref, {
        net: { mode: 'tap' },
        name: (img) => templateName(`${img.name.slice(0, 40)}-${img.manifestSha256.slice(0, 12)}`),
        log: (m) => this.o.log(`template of ${ref}: ${m}`),
      });
      return t.name;
    } catch (e) {
      const err = e as Error & { hint?: string };
      throw new TtrpcError(
        Code.FAILED_PRECONDITION,
        `cannot make a template of ${ref} (annotation ${IMAGE_ANNOTATION}): ${err.message}${err.hint ? ` (${err.hint})` : ''}`,
      );
    }
  }

  /** The template a snapshot reference stands for on this node: pulled at the first pod (once per node and digest), under SCION_SHIM_IMAGES. */
  private async snapshotTemplate(ref: string): Promise<string> {
    const allowed = config().shimImagePrefixes;
    if (!imageAllowed(ref, allowed))
      throw new TtrpcError(
        Code.PERMISSION_DENIED,
        `template snapshot ${ref} is not under a reference this node allows (SCION_SHIM_IMAGES: ${allowed.length ? allowed.join(', ') : 'unset, so none'})`,
      );
    const { ensureSnapshotTemplate } = await import('../host/index.ts');
    try {
      const t = await ensureSnapshotTemplate(ref, { log: (m) => this.o.log(`template snapshot ${ref}: ${m}`) });
      if (t.pulled) this.o.log(`pulled template snapshot ${ref} as ${t.name}`);
      return t.name;
    } catch (e) {
      const err = e as Error & { hint?: string };
      throw new TtrpcError(Code.FAILED_PRECONDITION, `cannot pull template snapshot ${ref}: ${err.message}${err.hint ? ` (${err.hint})` : ''}`);
    }
  }

  /** The pod's VM: made once, by its first task: out of the node's pool, else forked (or booted cold when asked). */
  async get(annotations: Record<string, string>, hostname?: string, netns?: string, dns?: DnsConfig): Promise<Machine> {
    if (this.machine) return this.machine;
    const mode = bootMode(annotations);
    if (!mode)
      throw new TtrpcError(
        Code.INVALID_ARGUMENT,
        `annotation ${BOOT_ANNOTATION}: ${JSON.stringify(annotations[BOOT_ANNOTATION])} is not one of ${BOOT_MODES.join(', ')}`,
      );
    this.forking ??= (async () => {
      const template = await this.templateFor(annotations);
      const pod = netns ? { netns, dev: 'eth0' } : undefined;
      const owner = { pid: process.pid, kind: 'shim' };
      const t0 = performance.now();
      const poolSize = config().shimPool;
      let how = mode === 'cold' ? 'booted' : 'forked';
      const make = async (): Promise<Machine> => {
        if (mode === 'cold') return this.coldBoot(template, { hostname, pod, owner, dns });
        const pooled = mode === 'pool' && poolSize > 0 ? await Machine.claimPooled(template, { hostname, pod, dns, owner, log: this.o.log }) : undefined;
        if (pooled) {
          how = 'taken from the pool';
          return pooled;
        }
        return Machine.fork(template, { prefix: 'pod', hostname, pod, owner, dns });
      };
      const m = await make().catch((e: Error & { hint?: string }) => {
        throw new TtrpcError(
          Code.FAILED_PRECONDITION,
          `cannot fork a pod VM from template ${template}: ${e.message}${e.hint ? ` (${e.hint}; the template comes from the annotation ${TEMPLATE_ANNOTATION}, else SCION_SHIM_TEMPLATE, else pod-tpl)` : ''}`,
        );
      });
      try {
        this.agent = await m.agent();
        // task stdio on ports needs an agent of protocol 2 (a template frozen with an older image's agent would lose every byte)
        if ((this.agent.protocol ?? 0) < TASK_PROTOCOL)
          throw new TtrpcError(
            Code.FAILED_PRECONDITION,
            `the agent of template ${template} speaks protocol ${this.agent.protocol ?? 'unknown'}; pods need ${TASK_PROTOCOL} (task stdio on ports): rebuild its image and freeze the template again`,
          );
      } catch (e) {
        await m.remove({ force: true }).catch(() => undefined);
        throw e;
      }
      this.o.log(`pod VM ${m.name} ${how} and its agent reached in ${(performance.now() - t0).toFixed(0)} ms`);
      this.agent.onEvent(this.o.onEvent);
      // the VM went away under the pod (its QEMU killed, or removed): every process of it ended, as if SIGKILLed
      this.agent.onClosed(() => {
        if (this.machine === m) this.o.onGone();
      });
      if (this.closing.signal.aborted) {
        await m.remove({ force: true }).catch(() => undefined);
        throw new TtrpcError(Code.UNAVAILABLE, 'the shim is shutting down');
      }
      this.machine = m;
      // the pool is refilled once this pod's first container has started (or a while after, if none does): off its path
      if (mode === 'pool' && poolSize > 0) {
        this.poolTemplate = template;
        this.refillIn(REFILL_AFTER_MS);
      }
      return m;
    })();
    try {
      return await this.forking;
    } finally {
      this.forking = undefined;
    }
  }

  private poolTemplate?: string;
  private refillTimer?: NodeJS.Timeout;
  private filling?: Promise<void>;

  /** Aborted when the shim goes: a refill under way stops, no pod VM is made any more. */
  private readonly closing = new AbortController();

  /** Refill the pool `ms` from now (the last call's time counts). */
  private refillIn(ms: number): void {
    if (this.closing.signal.aborted) return;
    clearTimeout(this.refillTimer);
    this.refillTimer = setTimeout(() => this.refillPool(), ms);
    this.refillTimer.unref();
  }

  /** Fill the node's pool of this pod's template (once per shim; another shim at it already makes this a no-op). */
  private refillPool(): void {
    clearTimeout(this.refillTimer);
    const template = this.poolTemplate;
    if (!template || this.filling) return;
    this.poolTemplate = undefined;
    const t0 = performance.now();
    this.filling = Machine.fillPool(template, { size: config().shimPool, prefix: 'pod', log: this.o.log, signal: this.closing.signal })
      .then((n) => {
        if (n) this.o.log(`pool of ${template}: ${n} VM${n > 1 ? 's' : ''} added in ${(performance.now() - t0).toFixed(0)} ms`);
      })
      .catch((e) => this.o.log(`pool of ${template} not refilled: ${(e as Error).message}`))
      .finally(() => {
        this.filling = undefined;
        this.o.onIdleChange?.();
      });
  }

  /** Wait for a pool refill under way (a shim about to exit lets it finish: the VM it makes is not the pod's). */
  async settled(): Promise<void> {
    clearTimeout(this.refillTimer);
    await this.filling;
  }

  /**
   * No template: boot the template's image afresh for this pod (annotation
   * io.scion.boot: cold), as a VM runtime without templating does: the
   * baseline bench:cri compares the fork with.
   */
  private async coldBoot(
    template: string,
    o: { hostname?: string; pod?: { netns: string; dev: string }; owner: { pid: number; kind: string }; dns?: DnsConfig },
  ): Promise<Machine> {
    const tpl = await Machine.find(template);
    if (!tpl) throw new TtrpcError(Code.FAILED_PRECONDITION, `no template ${template} to take the image of`);
    const img = await loadImage(tpl.info().image);
    tpl.close();
    return Machine.boot(img, {
      name: `pod-cold-${randomBytes(4).toString('hex')}`,
      hostname: o.hostname,
      net: o.pod ? { mode: 'pod', ...o.pod } : undefined,
      owner: o.owner,
      dns: o.dns,
    });
  }

  /**
   * The shim is going (SIGTERM, or its containerd is gone): hand back what it
   * holds. A refill under way stops after the fork it is in (that VM is
   * removed; VMs already pooled are the node's and stay), a pod VM being made
   * is removed once made, the pod's VM goes.
   */
  async shutdown(): Promise<void> {
    this.closing.abort();
    clearTimeout(this.refillTimer);
    this.poolTemplate = undefined;
    await this.forking?.catch(() => undefined);
    await this.filling;
    await this.teardown();
  }

  /** The pod VM and everything of it go. */
  async teardown(): Promise<void> {
    const m = this.machine;
    this.machine = undefined;
    if (!m) return;
    await m.remove({ force: true }).catch((e: Error & { code?: string }) => {
      if (e.code !== 'E_NO_VM') throw e;
    }); // gone already: nothing to do
    m.close();
  }
}
