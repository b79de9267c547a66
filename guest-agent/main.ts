/**
 * Entry point in the guest, run by QuickJS (`qjs -m`): find the
 * virtio-serial port by name (no udev in the guest, so through sysfs), read
 * the image config, serve the protocol. `--stdio` serves on stdin/stdout
 * instead (the agent's tests drive it that way; there is no socket in
 * QuickJS, so no listening mode).
 */
import * as os from 'os';
import { Agent, type ImageConfig } from './agent.ts';
import { GUEST_IMAGE_CONFIG } from '../common/contracts.ts';
import { PORT_NAME } from './protocol.ts';
import { sleep } from './platform.ts';
import { qjsPlatform as platform, fdTransport, portTransport, watchKernelLog } from './platform-qjs.ts';

function findPort(): string | undefined {
  const link = `/dev/virtio-ports/${PORT_NAME}`;
  if (platform.exists(link)) return link;
  try {
    for (const d of platform.readdir('/sys/class/virtio-ports')) {
      if (platform.readText(`/sys/class/virtio-ports/${d}/name`).trim() === PORT_NAME) {
        platform.mkdirp('/dev/virtio-ports');
        os.symlink(`/dev/${d}`, link); // udev-less guest: a failure means the link exists already, and the port is opened by its /dev name anyway
        return `/dev/${d}`;
      }
    }
  } catch {
    /* no virtio-ports in sysfs yet: looked for again */
  }
  return undefined;
}

const args = scriptArgs.slice(1);
const env = (k: string) => platform.env(k);
const root = env('SCION_AGENT_ROOT') ?? '';
const imagePath = env('SCION_IMAGE_CONFIG') ?? `${root}${GUEST_IMAGE_CONFIG}`;
const image: ImageConfig = JSON.parse(platform.readText(imagePath));
const agent = new Agent({
  platform,
  image,
  system: { root, setClock: env('SCION_AGENT_SET_CLOCK') !== '0', defaultInterface: image.network?.interface ?? 'eth0', dhcp: image.network?.mode === 'dhcp' },
  stateFile: env('SCION_AGENT_STATE') ?? '/run/scion-agent.state',
  logDir: env('SCION_AGENT_LOGS') ?? '/run/scion/logs',
});

async function serve(): Promise<void> {
  if (args.includes('--stdio')) {
    agent.attach(fdTransport(0, 1));
    platform.log('serving on stdio');
  } else {
    let port = findPort();
    while (!port) {
      await sleep(platform, 200);
      port = findPort();
    }
    agent.attach(portTransport(port));
    platform.log(`serving on ${port}`);
  }
  // the kernel logs "crng reseeded due to virtual machine fork" when vmgenid changes
  if (env('SCION_AGENT_KMSG') !== '0')
    watchKernelLog((text) => {
      if (text.includes('due to virtual machine fork')) agent.onVmFork();
    });
  await agent.boot();
}

serve().catch((e) => platform.log(`boot: ${(e as Error)?.stack ?? e}`));
