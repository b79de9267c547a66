/**
 * The agent protocol, version 1 (see PROTOCOL.md). Pure: message shapes and
 * argument validation; no I/O.
 */
export { PROTOCOL_VERSION, COMMANDS, type AgentCommand as Command } from '../common/agent-protocol.ts';
import { COMMANDS, type AgentErrorCode, type AgentCommand } from '../common/agent-protocol.ts';
export const MAX_FRAME = 1 << 20;
export { AGENT_PORT_NAME as PORT_NAME } from '../common/contracts.ts';

export type ErrorCode = AgentErrorCode;

export class ProtocolError extends Error {
  constructor(
    readonly code: ErrorCode,
    message: string,
  ) {
    super(message);
  }
}

export interface Request {
  id: string | number;
  cmd: AgentCommand;
  args: Record<string, unknown>;
}

export function parseRequest(line: string): Request {
  let msg: { id?: unknown; cmd?: unknown; args?: unknown } | null;
  try {
    msg = JSON.parse(line);
  } catch (e) {
    throw new ProtocolError('E_BAD_JSON', `invalid JSON: ${(e as Error).message}`);
  }
  if (!msg || typeof msg !== 'object' || Array.isArray(msg)) throw new ProtocolError('E_BAD_REQUEST', 'a request is a JSON object');
  if (typeof msg.id !== 'string' && typeof msg.id !== 'number') throw new ProtocolError('E_BAD_REQUEST', 'request.id must be a string or number');
  if (typeof msg.cmd !== 'string') throw new ProtocolError('E_BAD_REQUEST', 'request.cmd must be a string');
  if (msg.args !== undefined && (typeof msg.args !== 'object' || msg.args === null || Array.isArray(msg.args)))
    throw new ProtocolError('E_BAD_ARGS', 'request.args must be an object');
  if (!(COMMANDS as readonly string[]).includes(msg.cmd))
    throw new ProtocolError('E_UNKNOWN_COMMAND', `unknown command "${String(msg.cmd).slice(0, 64)}"; known: ${COMMANDS.join(', ')}`);
  return { id: msg.id, cmd: msg.cmd as AgentCommand, args: (msg.args as Record<string, unknown> | undefined) ?? {} };
}

/** Best effort: the id of a frame that failed to parse fully, so the error can be matched. */
export function salvageId(line: string): string | number | null {
  try {
    const m = JSON.parse(line);
    if (m && (typeof m.id === 'string' || typeof m.id === 'number')) return m.id;
  } catch {
    /* not JSON at all: no id to salvage */
  }
  return null;
}

import { HOSTNAME_PATTERN, DNS_SEARCH_PATTERN, DNS_OPTION_PATTERN, IPV4_PATTERN, type Identity } from '../common/contracts.ts';
export type { Identity };

const MAC = /^([0-9a-f]{2}:){5}[0-9a-f]{2}$/;
const IPV4 = IPV4_PATTERN;

function bad(field: string, why: string): never {
  throw new ProtocolError('E_BAD_ARGS', `${field}: ${why}`);
}

export function validateIdentity(a: Record<string, unknown>): Identity {
  const gen = a.generation;
  if (typeof gen !== 'number' || !Number.isInteger(gen) || gen < 1) bad('generation', 'must be an integer >= 1');
  if (typeof a.hostname !== 'string' || !HOSTNAME_PATTERN.test(a.hostname)) bad('hostname', 'must be a valid host name (letters, digits, -; at most 63)');
  if (typeof a.machineId !== 'string' || !/^[0-9a-f]{32}$/.test(a.machineId)) bad('machineId', 'must be 32 lowercase hex digits');
  if (!Array.isArray(a.interfaces) || a.interfaces.length === 0 || a.interfaces.length > 8) bad('interfaces', 'must be a list of 1..8 interfaces');
  const interfaces = (a.interfaces as { name?: unknown; mac?: unknown; address?: unknown; prefix?: unknown; gateway?: unknown }[]).map((i, k) => {
    if (!i || typeof i !== 'object') bad(`interfaces[${k}]`, 'must be an object');
    const mac = String(i.mac ?? '').toLowerCase();
    if (!MAC.test(mac)) bad(`interfaces[${k}].mac`, `${JSON.stringify(i.mac)} is not a MAC address like 52:54:00:12:34:56`);
    if (parseInt(mac.slice(0, 2), 16) & 1) bad(`interfaces[${k}].mac`, 'is a multicast address');
    if (i.name !== undefined && (typeof i.name !== 'string' || !/^[a-z0-9]{1,15}$/.test(i.name))) bad(`interfaces[${k}].name`, 'must be an interface name');
    if (i.address !== undefined && (typeof i.address !== 'string' || !IPV4.test(i.address)))
      bad(`interfaces[${k}].address`, `${JSON.stringify(i.address)} is not an IPv4 address`);
    if (i.prefix !== undefined && (typeof i.prefix !== 'number' || !Number.isInteger(i.prefix) || i.prefix < 1 || i.prefix > 32))
      bad(`interfaces[${k}].prefix`, 'must be 1..32');
    if (i.gateway !== undefined && (typeof i.gateway !== 'string' || !IPV4.test(i.gateway))) bad(`interfaces[${k}].gateway`, 'is not an IPv4 address');
    return { name: i.name, mac, address: i.address, prefix: i.prefix ?? (i.address ? 24 : undefined), gateway: i.gateway };
  });
  const dns = a.dns === undefined ? [] : a.dns;
  if (!Array.isArray(dns) || dns.some((d) => typeof d !== 'string' || !IPV4.test(d))) bad('dns', 'must be a list of IPv4 addresses');
  const list = (v: unknown, field: string, pattern: RegExp, max: number, what: string): string[] | undefined => {
    if (v === undefined) return undefined;
    if (!Array.isArray(v) || v.length > max || v.some((d) => typeof d !== 'string' || !pattern.test(d))) bad(field, `must be a list of at most ${max} ${what}`);
    return v as string[];
  };
  const dnsSearch = list(a.dnsSearch, 'dnsSearch', DNS_SEARCH_PATTERN, 6, 'domain names');
  const dnsOptions = list(a.dnsOptions, 'dnsOptions', DNS_OPTION_PATTERN, 16, 'resolver options like ndots:5');
  if (a.rngSeed !== undefined && (typeof a.rngSeed !== 'string' || !/^([0-9a-f]{2}){16,512}$/.test(a.rngSeed))) bad('rngSeed', 'must be 32..1024 hex digits');
  if (a.time !== undefined && (typeof a.time !== 'number' || !Number.isFinite(a.time) || a.time < 0)) bad('time', 'must be milliseconds since the epoch');
  if (a.vmgenid !== undefined && (typeof a.vmgenid !== 'string' || !/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/.test(a.vmgenid)))
    bad('vmgenid', 'must be a lowercase UUID');
  return {
    generation: gen as number,
    hostname: a.hostname as string,
    machineId: a.machineId as string,
    interfaces,
    dns: dns as string[],
    dnsSearch,
    dnsOptions,
    rngSeed: a.rngSeed as string | undefined,
    time: a.time as number | undefined,
    vmgenid: a.vmgenid as string | undefined,
  };
}

export function requireString(a: Record<string, unknown>, k: string): string {
  if (typeof a[k] !== 'string' || !(a[k] as string).length) bad(k, 'must be a non-empty string');
  return a[k] as string;
}
