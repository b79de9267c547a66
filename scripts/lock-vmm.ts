/**
 * Resolve the pinned VMM afresh (qemu-system-x86 and its closure from Debian
 * trixie) and write vmm/qemu.scion.lock. Templates frozen under the old
 * closure stop forking (their record names it): freeze them again.
 *   npm run lock:vmm [-- --mirror URL]
 */
import { lockVmm } from '../builder/vmm.ts';

const i = process.argv.indexOf('--mirror');
await lockVmm({ mirror: i > 0 ? process.argv[i + 1] : undefined, log: (m) => console.log(m) });
