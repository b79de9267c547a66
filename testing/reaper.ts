/**
 * The fixtures' watchdog, run detached: `reaper <pid>`. When process <pid> is
 * gone without having stopped us (its run failed hard, was interrupted or
 * killed), remove every VM it owned or was making, then exit. A normal
 * teardown sends SIGTERM first and nothing is touched.
 */
import { list, removeVm, type VmListing } from '../host/index.ts';
import { processAlive, sleep } from '../common/proc.ts';

const parent = Number(process.argv[2]);
if (!Number.isInteger(parent) || parent <= 1) {
  process.stderr.write('usage: reaper <pid>\n');
  process.exit(2);
}
process.on('SIGTERM', () => process.exit(0));

while (processAlive(parent)) await sleep(300);
let vms: VmListing[] = [];
try {
  vms = await list();
} catch {
  process.exit(0);
} // no run root: nothing was made
for (const v of vms) {
  if (v.owner?.pid === parent || v.makerPid === parent) await removeVm(v.name, { force: true }).catch(() => undefined);
}
