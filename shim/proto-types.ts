/**
 * TypeScript types for a protobuf service's messages, written from the shim's
 * descriptors (scripts/gen-proto.ts writes shim/proto/task-types.ts with it;
 * a unit test holds the file equal to a fresh run). The types say what
 * shim/proto.ts's decode gives (defaults filled, 64-bit integers and enums as
 * numbers, bytes as Buffers), so handlers read requests without casts.
 */
import type protobuf from 'protobufjs';

const SCALARS: Record<string, string> = {
  string: 'string',
  bool: 'boolean',
  bytes: 'Buffer',
  double: 'number',
  float: 'number',
  int32: 'number',
  uint32: 'number',
  sint32: 'number',
  fixed32: 'number',
  sfixed32: 'number',
  int64: 'number',
  uint64: 'number',
  sint64: 'number',
  fixed64: 'number',
  sfixed64: 'number',
};

/** A message's TypeScript name: its full name without dots (containerd.types.Mount -> ContainerdTypesMount), or the short name in the service's package. */
function tsName(full: string, pkg: string): string {
  const name = full.replace(/^\./, '');
  if (name.startsWith(`${pkg}.`) && !name.slice(pkg.length + 1).includes('.')) return name.slice(pkg.length + 1);
  return name
    .split('.')
    .map((s) => s[0].toUpperCase() + s.slice(1))
    .join('');
}

/** The module text: one interface per message reachable from `service`'s methods, and a method map. */
export function serviceTypes(root: protobuf.Root, service: string, header: string): string {
  const svc = root.lookupService(service);
  const pkg = svc.fullName.replace(/^\./, '').split('.').slice(0, -1).join('.');
  const out: string[] = [];
  const seen = new Set<string>();
  const emit = (type: protobuf.Type): void => {
    if (seen.has(type.fullName)) return;
    seen.add(type.fullName);
    const lines: string[] = [];
    const later: protobuf.Type[] = [];
    for (const f of type.fieldsArray) {
      f.resolve();
      let ts: string;
      if (SCALARS[f.type]) ts = SCALARS[f.type];
      else if (f.resolvedType && 'values' in f.resolvedType) ts = 'number';
      else if (f.resolvedType?.fullName === '.google.protobuf.Any') ts = '{ type_url: string; value: Buffer }';
      else {
        const t = f.resolvedType as protobuf.Type;
        later.push(t);
        ts = tsName(t.fullName, pkg);
      }
      if (f.map) ts = `Record<string, ${ts}>`;
      else if (f.repeated) ts = ts.includes(' ') ? `(${ts})[]` : `${ts}[]`;
      lines.push(`  ${f.name}: ${ts};`);
    }
    out.push(`export interface ${tsName(type.fullName, pkg)} {\n${lines.join('\n')}\n}`);
    for (const t of later) if (t.fullName !== '.google.protobuf.Any') emit(t);
  };
  const rows: string[] = [];
  for (const m of svc.methodsArray) {
    m.resolve();
    emit(m.resolvedRequestType!);
    emit(m.resolvedResponseType!);
    rows.push(`  ${m.name}: { request: ${tsName(m.resolvedRequestType!.fullName, pkg)}; response: ${tsName(m.resolvedResponseType!.fullName, pkg)} };`);
  }
  const name = svc.name;
  return [
    header,
    ...out.map((s) => s.replace(/\{\n\n\}/, '{}').replace('interface GoogleProtobufEmpty {}', 'type GoogleProtobufEmpty = Record<string, never>;')),
    `/** ${service}'s methods: what each is asked and answers. */\nexport interface ${name}Methods {\n${rows.join('\n')}\n}`,
    '',
  ].join('\n\n');
}
