/**
 * The fixtures' watchdog, run detached: `reaper <pid>`. When process <pid> is
 * gone without having stopped us (its run failed hard, was interrupted or
 * killed), remove every VM it owned or was making, then exit. A normal
 * teardown sends SIGTERM first and nothing is touched.
 */
import { readdir } from 'node:fs/promises';
import { validName } from '../common/names.ts';
import { removeVm } from '../host/lifecycle.ts';
import { vmsDir } from '../host/store/dirs.ts';
import { readRecord } from '../host/store/records.ts';
import { processAlive, sleep } from '../host/qemu/process.ts';

const parent = Number(process.argv[2]);
if (!Number.isInteger(parent) || parent <= 1) { process.stderr.write('usage: reaper <pid>\n'); process.exit(2); }
process.on('SIGTERM', () => process.exit(0));

while (processAlive(parent)) await sleep(300);
let names: string[] = [];
try { names = await readdir(vmsDir()); } catch { process.exit(0); }
for (const n of names) {
  let name;
  try { name = validName(n); } catch { continue; } // temp dirs and foreign names: not ours to judge
  const r = await readRecord(name).catch(() => undefined);
  if (r && (r.owner?.pid === parent || r.making?.ownerPid === parent)) await removeVm(name, { force: true }).catch(() => undefined);
}
