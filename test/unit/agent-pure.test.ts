/** The guest agent's pure parts: the post-fork network batch and the clock maths. */
import { describe, it, expect } from 'vitest';
import { networkScript, ipv6Renew, prefixToMask } from '../../guest-agent/identity.ts';
import { nextInterval, dateStepSeconds, driftFrom, phcStepArgs, edgeOffset } from '../../guest-agent/clock.ts';

const id = {
  generation: 2,
  hostname: 'web-1',
  machineId: 'a'.repeat(32),
  dns: ['10.0.2.3'],
  time: 1_795_000_000_600,
  interfaces: [{ mac: '02:53:43:00:00:01', address: '10.0.2.16', prefix: 24, gateway: '10.0.2.2' }],
};
const cfg = { setClock: true, defaultInterface: 'eth0', dhcp: false, root: '' };

describe('networkScript', () => {
  it('steps the clock by the exact difference (relative, to the microsecond), sets MAC, address and route, renews IPv6, and announces the address', () => {
    // the guest's clock reads an hour and 0.4 s behind the host's time the identity carries
    expect(networkScript(id, cfg, id.time - 3_600_400).split('\n')).toEqual([
      'set -e',
      '/usr/sbin/phc_ctl -q -Q -- CLOCK_REALTIME adj 3600.400000 >/dev/null',
      'busybox ifconfig eth0 hw ether 02:53:43:00:00:01 10.0.2.16 netmask 255.255.255.0 up',
      'ip route replace default via 10.0.2.2 dev eth0',
      'arping -U -c 1 -I eth0 10.0.2.16 >/dev/null 2>&1 &',
      ipv6Renew('eth0'),
      '',
    ]);
  });
  it('renews IPv6 with shell builtins only, and only where IPv6 is on', () => {
    const s = ipv6Renew('eth0');
    expect(s).toBe(
      'v6=; if [ -w /proc/sys/net/ipv6/conf/eth0/disable_ipv6 ]; then read v6 < /proc/sys/net/ipv6/conf/eth0/disable_ipv6 || :; fi; if [ "$v6" = 0 ]; then echo 1 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6; echo 0 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6; fi',
    );
  });
  it('leaves the clock alone when told to, and uses DHCP for DHCP images', () => {
    const s = networkScript(id, { ...cfg, setClock: false, dhcp: true, root: '/r' }, id.time);
    expect(s).not.toContain('phc_ctl');
    expect(s).toContain("SCION_ROOT='/r' busybox udhcpc -i eth0");
    expect(s).toContain('ip link set dev eth0 address 02:53:43:00:00:01 up');
    expect(s).toContain(ipv6Renew('eth0'));
  });
  it('converts prefixes to masks', () => {
    expect([0, 8, 20, 24, 32].map(prefixToMask)).toEqual(['0.0.0.0', '255.0.0.0', '255.255.240.0', '255.255.255.0', '255.255.255.255']);
  });
});

describe('clock maths', () => {
  it('rounds the whole-second step', () => {
    expect(dateStepSeconds(1_000_499)).toBe(1000);
    expect(dateStepSeconds(1_000_500)).toBe(1001);
  });
  it('sees whole seconds of drift, not only the fraction', () => {
    expect(driftFrom(891 - 980, 891)).toBe(-980);
    expect(driftFrom(891 + 3000, 891)).toBe(3000);
  });
  it('lengthens the interval while drift is small and shortens it when it grows, within bounds', () => {
    expect(nextInterval(10_000, 3)).toBe(20_000);
    expect(nextInterval(10_000, 20)).toBe(10_000);
    expect(nextInterval(40_000, -80)).toBe(20_000);
    expect(nextInterval(100_000, 1)).toBe(120_000);
    expect(nextInterval(10_000, 500)).toBe(10_000);
  });
  it('steps relatively, with "--" so a negative step is not read as an option', () => {
    expect(phcStepArgs(-925)).toBe('/usr/sbin/phc_ctl -q -Q -- CLOCK_REALTIME adj -0.925000');
  });
});

import { listeningOn, tcpTables, httpCheckArgv } from '../../guest-agent/health.ts';
import { batchText, DONE_MARKER } from '../../guest-agent/shell.ts';
import { hexBytes } from '../../guest-agent/identity.ts';
import { encodeJs, decodeJs, decodeBytewise } from '../../common/utf8.ts';
import { FrameDecoder, encodeFrame } from '../../common/framing.ts';

describe('health checks without sockets', () => {
  // a real /proc/net/tcp layout: 127.0.0.1:8080 listening, 0.0.0.0:22 listening, a connection from port 8081
  const tcp = `  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1 0 100 0 0 10 0
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1235 1 0 100 0 0 10 0
   2: 0100007F:1F91 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 1236 1 0 20 4 30 10 -1
`;
  const tcp6 = `  sl  local_address                         remote_address                        st
   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000
`;
  it('finds a listening port in tcp and tcp6 tables, and not an established one', () => {
    expect(listeningOn(tcp, 8080)).toBe(true);
    expect(listeningOn(tcp, 22)).toBe(true);
    expect(listeningOn(tcp, 8081)).toBe(false); // only a connection's local end
    expect(listeningOn(tcp6, 80)).toBe(true);
    expect(listeningOn('', 80)).toBe(false);
    expect(tcpTables(42)).toEqual(['/proc/42/net/tcp', '/proc/42/net/tcp6']);
    expect(tcpTables(undefined)).toEqual(['/proc/net/tcp', '/proc/net/tcp6']);
  });
  it('checks HTTP with one wget, its timeout in whole seconds, the path as one argument', () => {
    expect(httpCheckArgv(8080, '/a b?c', 2500)).toEqual(['busybox', 'wget', '-q', '-O', '/dev/null', '-T', '3', 'http://127.0.0.1:8080/a b?c']);
    expect(httpCheckArgv(80, '/', 100)[6]).toBe('1');
  });
});

describe('shell batches', () => {
  it('end with a marker carrying the batch number and status, which the worker finds', () => {
    const text = batchText(7, 'echo hi');
    expect(text).toBe('(\necho hi\n) </dev/null 2>&1\necho "__SCION_DONE_7_$?__"\n');
    expect(DONE_MARKER.exec('hi\n__SCION_DONE_7_0__\n')?.slice(1)).toEqual(['7', '0']);
  });
  it('hex seeds become their bytes', () => {
    expect([...hexBytes('00ff7f')]).toEqual([0, 255, 127]);
  });
});

describe('UTF-8 without TextEncoder (the agent on QuickJS)', () => {
  const native = new TextEncoder(),
    nd = new TextDecoder();
  it('encodes like TextEncoder: ASCII, 2-, 3- and 4-byte characters, lone surrogates', () => {
    for (const s of ['', 'plain', 'héllo wörld', '€ and ✓', '𝄞 music 🎉', 'lone \ud800 high', 'lone \udc00 low', 'x'.repeat(10000) + '🎉']) {
      expect(Buffer.from(encodeJs(s)).equals(Buffer.from(native.encode(s))), JSON.stringify(s).slice(0, 40)).toBe(true);
    }
  });
  it('decodes like TextDecoder, malformed input included (random bytes, seeded)', () => {
    let a = 12345;
    const rnd = () => {
      a = (a * 1103515245 + 12345) & 0x7fffffff;
      return a;
    };
    for (let i = 0; i < 2000; i++) {
      const b = new Uint8Array(1 + (rnd() % 40)).map(() => (rnd() % 3 === 0 ? 0x80 + (rnd() % 128) : rnd() % 256));
      expect(decodeJs(b), `bytes ${Buffer.from(b).toString('hex')}`).toBe(nd.decode(b));
      expect(decodeBytewise(b), `bytes ${Buffer.from(b).toString('hex')}`).toBe(nd.decode(b)); // the fallback alone
    }
    for (const s of ['héllo', '𝄞🎉', 'a'.repeat(9000) + 'é']) expect(decodeJs(native.encode(s))).toBe(s);
  });
  it('frames are bytes: split anywhere, even inside a character, they decode whole', () => {
    const frame = encodeFrame({ id: 1, text: 'héllo 🎉' });
    for (let cut = 1; cut < frame.length; cut++) {
      const d = new FrameDecoder();
      const evs = [...d.push(frame.subarray(0, cut)), ...d.push(frame.subarray(cut))];
      expect(evs).toEqual([{ frame: '{"id":1,"text":"héllo 🎉"}' }]);
    }
  });
});

describe('RTC edges', () => {
  it('are trusted only when seen between two reads a few ms apart (a starved guest sees them late)', () => {
    // the old second read at ...000.998, the new one (1_700_000_001) at ...001.001: the clock is 1 ms ahead at the edge
    expect(edgeOffset(1_700_000_000_998, 1_700_000_001_001, 1_700_000_001)).toBe(1);
    // the same edge seen 3 s late because the guest was not scheduled between the reads: no measurement
    expect(edgeOffset(1_700_000_000_998, 1_700_000_004_001, 1_700_000_001)).toBeUndefined();
    expect(edgeOffset(0, 6, 0)).toBeUndefined();
    expect(edgeOffset(0, 5, 0)).toBe(5);
  });
});

import { hasOwnPidNamespace, crunGlobalArgs, mountScript } from '../../guest-agent/task-spec.ts';

describe('pod tasks in the guest', () => {
  it('a task with a new pid namespace runs without a cgroup; one that joins or lacks one keeps it', () => {
    const spec = (namespaces: { type: string; path?: string }[]) => ({ linux: { namespaces } });
    expect(hasOwnPidNamespace(spec([{ type: 'pid' }, { type: 'mount' }]))).toBe(true);
    expect(hasOwnPidNamespace(spec([{ type: 'pid', path: '/proc/1/ns/pid' }]))).toBe(false);
    expect(hasOwnPidNamespace(spec([{ type: 'mount' }]))).toBe(false);
    expect(hasOwnPidNamespace({})).toBe(false);
    expect(crunGlobalArgs(true)).toEqual(['--cgroup-manager=disabled']);
    expect(crunGlobalArgs(false)).toEqual([]);
  });

  it('the rootfs: the disk read-only under an overlay whose writable layer is in the task directory', () => {
    const lines = mountScript('web', '/dev/vdb').split('\n');
    expect(lines).toContain('mount -t erofs -o ro /dev/vdb /run/scion/tasks/web/lower');
    expect(lines.at(-1)).toBe(
      'mount -t overlay -o lowerdir=/run/scion/tasks/web/lower,upperdir=/run/scion/tasks/web/rw/upper,workdir=/run/scion/tasks/web/rw/work overlay /run/scion/tasks/web/rootfs',
    );
  });
});

import { onTerminal, resizeArgv, withPidNamespace } from '../../guest-agent/task-spec.ts';

describe('a task on a terminal', () => {
  it('runs crun under util-linux script (a pty, its exit status, no echo, no file); stty sizes the pty', () => {
    const argv = onTerminal(['crun', 'exec', '--process', "/run/it's.json", 'web']);
    expect(argv.slice(0, 6)).toEqual(['/usr/bin/script', '--quiet', '--return', '--echo', 'never', '--command']);
    expect(argv.at(-1)).toBe('/dev/null');
    // the command is one shell string: each word quoted, a quote inside a word too
    expect(argv[6]).toBe(`'crun' 'exec' '--process' '/run/it'\\''s.json' 'web'`);
    expect(resizeArgv('/dev/pts/3', 100, 30)).toEqual(['busybox', 'stty', '-F', '/dev/pts/3', 'rows', '30', 'cols', '100']);
  });

  it("a container sharing the pod's pid namespace joins it by path, its other namespaces kept", () => {
    expect(withPidNamespace({ namespaces: [{ type: 'pid' }, { type: 'mount' }], maskedPaths: ['/x'] }, '/proc/7/ns/pid')).toEqual({
      namespaces: [{ type: 'mount' }, { type: 'pid', path: '/proc/7/ns/pid' }],
      maskedPaths: ['/x'],
    });
    expect(withPidNamespace(undefined, '/p')).toEqual({ namespaces: [{ type: 'pid', path: '/p' }] });
  });
});

import { ClockKeeper } from '../../guest-agent/clock.ts';
import type { Platform } from '../../guest-agent/platform.ts';

/**
 * An RTC whose seconds tick `phaseMs` after the system clock's, read through a
 * platform whose reads take `readMs()` each (busy: a guest starved by a loaded
 * host sees every edge late).
 */
function rtcPlatform(phaseMs: number, readMs: () => number): Platform {
  return {
    readText: () => {
      const until = Date.now() + readMs();
      while (Date.now() < until) {
        /* a slow read */
      }
      return String(Math.floor((Date.now() - phaseMs) / 1000));
    },
    setTimeout: (cb: () => void, ms: number) => setTimeout(cb, ms),
    clearTimeout: (t: unknown) => clearTimeout(t as NodeJS.Timeout),
  } as unknown as Platform;
}

describe('clock calibration against the RTC', () => {
  it('measures the RTC phase when edges are seen promptly', async () => {
    const k = new ClockKeeper(
      rtcPlatform(300, () => 0),
      undefined as never,
      true,
      '/rtc',
    );
    const phase = await k.calibrate();
    expect(phase).toBeGreaterThanOrEqual(300);
    expect(phase).toBeLessThanOrEqual(305);
    expect(k.state.lastError).toBeUndefined();
  });
  it('looks again when an edge came too late to trust, and uses the first it can trust', async () => {
    const starvedUntil = Date.now() + 2000; // the first attempt sees only late edges
    const k = new ClockKeeper(
      rtcPlatform(700, () => (Date.now() < starvedUntil ? 8 : 0)),
      undefined as never,
      true,
      '/rtc',
    );
    const phase = await k.calibrate(3);
    expect(phase).toBeGreaterThanOrEqual(700);
    expect(phase).toBeLessThanOrEqual(705);
  });
  it('reports, never throws, when no edge can be trusted: the phase stays unknown and checks leave the clock alone', async () => {
    const k = new ClockKeeper(
      rtcPlatform(100, () => 8),
      undefined as never,
      true,
      '/rtc',
    );
    await expect(k.calibrate(2)).resolves.toBeUndefined();
    expect(k.state.rtcPhaseMs).toBeUndefined();
    expect(k.state.lastError).toMatch(/not calibrated: the RTC \(\/rtc\) did not tick when expected \(2 attempts\)/);
    await expect(k.check()).resolves.toBe(0);
  }, 15_000);
});
