/**
 * scion/testing: running clones of your image in vitest.
 *
 *   import { scionTest } from 'scion/testing';
 *   const test = scionTest({ image: './image.yaml', count: 3 });
 *   test('every clone has its own hostname', async ({ clones }) => { … });
 *
 * The clones are made once per test file (a file-scoped fixture), shared by
 * its tests, and removed after the file, also when a test fails; if the run
 * is interrupted or killed, a watchdog process removes them.
 */
import { test as base, beforeAll, afterAll } from 'vitest';
import { startClones, type ClonesOptions, type CloneSet, type TestClone } from './clones.ts';

export { startClones, TestClone, type ClonesOptions, type CloneSet, type ExecResult, type HttpResult } from './clones.ts';

/** A vitest `test` with a `clones` fixture: N running clones of the image, made once per file. */
export function scionTest(opts: ClonesOptions) {
  return base.extend<{ clones: TestClone[] }>({
    clones: [
      // biome-ignore lint/correctness/noEmptyPattern: vitest reads a fixture's dependencies from this first parameter's destructuring
      async ({}, use) => {
        const set = await startClones(opts);
        try {
          await use(set.clones);
        } finally {
          await set.close();
        }
      },
      { scope: 'file' },
    ],
  });
}

/** The hook style: clones made in beforeAll of the enclosing suite, removed in its afterAll. */
export function useClones(opts: ClonesOptions): { readonly clones: TestClone[] } {
  let set: CloneSet | undefined;
  beforeAll(async () => {
    set = await startClones(opts);
  }, 600_000);
  afterAll(async () => {
    await set?.close();
  });
  return {
    get clones() {
      if (!set) throw new Error('useClones: the clones exist inside tests, after beforeAll');
      return set.clones;
    },
  };
}
