/** The guest agent's pure parts: the post-fork network batch and the clock maths. */
import { describe, it, expect } from 'vitest';
import { networkScript, ipv6Renew, prefixToMask } from '../../guest-agent/identity.ts';
import { nextInterval, dateStepSeconds, driftFrom, phcStepArgs } from '../../guest-agent/clock.ts';

const id = { generation: 2, hostname: 'web-1', machineId: 'a'.repeat(32), dns: ['10.0.2.3'], time: 1_795_000_000_600, interfaces: [{ mac: '02:53:43:00:00:01', address: '10.0.2.16', prefix: 24, gateway: '10.0.2.2' }] };
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
    expect(s).toBe('v6=; if [ -w /proc/sys/net/ipv6/conf/eth0/disable_ipv6 ]; then read v6 < /proc/sys/net/ipv6/conf/eth0/disable_ipv6 || :; fi; if [ "$v6" = 0 ]; then echo 1 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6; echo 0 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6; fi');
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
