/**
 * A real OCI registry for tests: Debian's docker-registry (distribution 2.8)
 * on 127.0.0.1, a free port, storage in a temp dir, JSON logs we can count
 * requests in; optionally with htpasswd (bcrypt) auth.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { $ } from 'zx';
import { tmpdir } from 'node:os';

const tmp = (prefix: string) => mkdtempSync(join(tmpdir(), `scion-${prefix}-`));

export interface TestRegistry {
  host: string;
  storage: string;
  requests(method: string, uriPart: string): number;
  stop(): Promise<void>;
}

const freePort = () =>
  new Promise<number>((res) => {
    const s = createServer().listen(0, '127.0.0.1', () => {
      const p = (s.address() as any).port;
      s.close(() => res(p));
    });
  });

export async function startRegistry(opts: { user?: string; password?: string } = {}): Promise<TestRegistry> {
  const dir = tmp('registry');
  const port = await freePort();
  let auth = '';
  if (opts.user) {
    const line = (await $`htpasswd -Bbn ${opts.user} ${opts.password!}`.quiet()).stdout.trim();
    writeFileSync(join(dir, 'htpasswd'), line + '\n');
    auth = `auth:\n  htpasswd:\n    realm: scion-test\n    path: ${join(dir, 'htpasswd')}\n`;
  }
  writeFileSync(
    join(dir, 'config.yml'),
    `version: 0.1\nlog:\n  level: info\n  formatter: json\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: ${join(dir, 'data')}\nhttp:\n  addr: 127.0.0.1:${port}\n${auth}`,
  );
  const logFile = join(dir, 'registry.log');
  writeFileSync(logFile, '');
  const { openSync } = await import('node:fs');
  const fd = openSync(logFile, 'a');
  const proc: ChildProcess = spawn('docker-registry', ['serve', join(dir, 'config.yml')], { stdio: ['ignore', fd, fd] });
  for (let i = 0; ; i++) {
    const up = await fetch(`http://127.0.0.1:${port}/v2/`).then(
      () => true,
      () => false,
    );
    if (up) break;
    if (i > 100 || proc.exitCode !== null) throw new Error(`docker-registry did not start: ${readFileSync(logFile, 'utf8').slice(-500)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  return {
    host: `127.0.0.1:${port}`,
    storage: join(dir, 'data'),
    requests: (method, uriPart) =>
      readFileSync(logFile, 'utf8')
        .split('\n')
        .filter((l) => l.includes(`"http.request.method":"${method}"`) && l.includes(uriPart) && l.includes('"msg":"response completed')).length,
    // its storage and log go with it
    stop: () =>
      new Promise<void>((res) => {
        if (proc.exitCode !== null) return res();
        proc.once('exit', () => res());
        proc.kill('SIGTERM');
      }).then(() => rmSync(dir, { recursive: true, force: true })),
  };
}
