#!/usr/bin/env node
// A CI pipeline for a project that builds a scion image: build it with the
// committed lock, check the build is reproducible, run the project's identity
// tests against clones of it, push it to a registry. Run from the project's
// root, where scion, vitest and zx are installed:
//
//   IMAGE=image.yaml PUSH_TO=registry.example.com/team/idtest:$GIT_SHA node ci.mjs
//
// IMAGE     the image definition (default image.yaml); its lock must be committed
// PUSH_TO   registry/repository:tag to push to (unset: no push)
// OUT       build output directory (default out)
// Credentials for the registry: $DOCKER_CONFIG/config.json (docker login writes it).
// Exit status: the failing step's (scion's exit codes: 3 definition/lock, 4 network, 5 verification).
import { $, echo, fs } from 'zx';

$.verbose = false;
const image = process.env.IMAGE || 'image.yaml';
const out = process.env.OUT || 'out';
const pushTo = process.env.PUSH_TO;
const step = async (name, fn) => {
  const t0 = Date.now();
  echo(`::group::${name}`);
  try {
    return await fn();
  } catch (e) {
    echo(`${name} failed${e.exitCode !== undefined ? ` (exit ${e.exitCode})` : ''}`);
    if (e.stderr) echo(e.stderr.trim());
    if (e.stdout) echo(e.stdout.trim());
    process.exit(e.exitCode || 1);
  } finally {
    echo(`::endgroup:: ${name}: ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  }
};

const built = await step('build (locked)', async () => JSON.parse((await $`npx scion build ${image} --locked --out ${out} --json`).stdout));
for (const o of built.outputs) echo(`  ${o.name} ${o.size} bytes sha256:${o.sha256}`);

const verified = await step('verify (two builds from empty caches)', async () => JSON.parse((await $`npx scion verify ${image} --json`).stdout));
echo(`  ${verified.name}: ${verified.identical ? 'identical' : 'NOT reproducible'}`);

await step('identity tests', async () => {
  echo((await $`npx vitest run`).stdout.trim().split('\n').slice(-6).join('\n'));
});

if (pushTo) {
  const pushed = await step(`push to ${pushTo}`, async () => JSON.parse((await $`npx scion push ${built.dir} ${pushTo} --json`).stdout));
  echo(`  ${pushed.reference} (uploaded: ${pushed.uploaded.join(', ') || 'nothing new'})`);
  await fs.writeJson(
    'ci-result.json',
    { image: built.name, outputs: built.outputs, reproducible: verified.identical, pushed: pushed.reference },
    { spaces: 2 },
  );
} else {
  await fs.writeJson('ci-result.json', { image: built.name, outputs: built.outputs, reproducible: verified.identical }, { spaces: 2 });
}
echo('ci: done');
