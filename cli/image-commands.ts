/**
 * The image commands of the table (commands.ts): build, verify, push, pull.
 */
import { ScionError, EXIT } from '../common/errors.ts';
import { statSync } from 'node:fs';
import { build, verify, push, pull, pushTemplate, pullTemplate, snapshotKindOf, pushHibernated, pullHibernated, Machine } from '../host/index.ts';
import { buildProgress, fmtBytes } from './format.ts';

import { BUILD_INPUT, INSECURE, compressionOf, need, str, type CommandSpec } from './options.ts';

/** A build directory (an image to push), as opposed to a template's name. */
function isDirectory(p: string): boolean {
  try {
    return statSync(p).isDirectory();
  } catch {
    return false;
  }
}

export const IMAGE_COMMANDS: CommandSpec[] = [
  {
    name: 'build',
    args: '<image.yaml>',
    summary: 'build DIR/<name>/: vmlinuz, initrd.img, manifest.json, sbom.cdx.json (CycloneDX 1.6), provenance.intoto.json (SLSA v1)',
    options: {
      out: { type: 'string', value: 'DIR', help: 'output directory (default ./out)' },
      'update-lock': { type: 'boolean', help: 're-resolve packages and rewrite <image>.scion.lock' },
      locked: { type: 'boolean', help: 'CI: fail (exit 3) if the lock is missing or would change' },
      ...BUILD_INPUT,
    },
    cleansUpOnInterrupt: true,
    async run(pos, v, ctx) {
      if (pos.length !== 1)
        throw new ScionError('E_USAGE', 'scion build needs exactly one image definition', { hint: 'scion build images/minimal.yaml --out out' });
      const r = await build({
        definitionPath: pos[0],
        outDir: str(v, 'out'),
        updateLock: !!v['update-lock'],
        locked: !!v.locked,
        mirror: str(v, 'mirror'),
        compression: compressionOf(str(v, 'compression')),
        onEvent: ctx.json ? undefined : buildProgress(ctx.err),
      });
      if (ctx.json) {
        ctx.out(JSON.stringify({ ok: true, ...r }, null, 2));
        return EXIT.ok;
      }
      ctx.out(`built ${r.name} -> ${r.dir}`);
      for (const o of r.outputs) ctx.out(`  ${o.name.padEnd(23)} ${fmtBytes(o.size).padStart(10)}  sha256 ${o.sha256}`);
      ctx.out(`  ${r.packages} packages; lock ${r.lockChanged ? 'written' : 'unchanged'}: ${r.lock}`);
      ctx.out(`  stripped ${r.stripped.files} ELF file(s): ${fmtBytes(r.stripped.bytes)} of debug sections and symbol tables`);
      ctx.out(`  largest files in the initramfs (${fmtBytes(r.sizes.initrdUncompressed)} in all):`);
      for (const f of r.largest) ctx.out(`    ${fmtBytes(f.size).padStart(10)}  ${f.path}`);
      ctx.out(`  what each package contributes (left out by exclude globs: ${r.excluded.files} file(s), ${fmtBytes(r.excluded.bytes)}):`);
      for (const p of r.packageSizes.slice(0, 10)) ctx.out(`    ${fmtBytes(p.bytes).padStart(10)}  ${p.name} (${p.files} files)`);
      return EXIT.ok;
    },
  },
  {
    name: 'verify',
    args: '<image.yaml>',
    summary: 'build twice, each from an empty cache in a temporary directory, and compare: "identical", or the first differing file (inside the initramfs)',
    options: { ...BUILD_INPUT },
    cleansUpOnInterrupt: true,
    async run(pos, v, ctx) {
      if (pos.length !== 1) throw new ScionError('E_USAGE', 'scion verify needs exactly one image definition', { hint: 'scion verify images/minimal.yaml' });
      if (!ctx.json) ctx.err('[verify] two builds, one after the other, each from an empty cache in a temporary directory');
      const r = await verify({
        definitionPath: pos[0],
        mirror: str(v, 'mirror'),
        compression: compressionOf(str(v, 'compression')),
        onEvent: ctx.json
          ? undefined
          : (n, ev) => {
              if (ev.type === 'step') ctx.err(`[verify] build ${n}: ${ev.step} done in ${(ev.ms / 1000).toFixed(1)} s`);
            },
      });
      if (ctx.json) ctx.out(JSON.stringify({ ok: r.identical, ...r }, null, 2));
      else if (r.identical) {
        ctx.out(`${r.name}: identical: two builds from empty caches gave the same bytes`);
        for (const o of r.outputs) ctx.out(`  ${o.name.padEnd(23)} ${fmtBytes(o.size[0]).padStart(10)}  sha256 ${o.sha256[0]}`);
      } else {
        const d = r.difference!;
        ctx.out(`${r.name}: NOT reproducible: ${d.output}${d.path ? `: ${d.path}` : ''}: ${d.how}`);
      }
      return r.identical ? EXIT.ok : EXIT.verification;
    },
  },
  {
    name: 'push',
    args: '<out/name>|<template>|<hibernated clone> <registry>/<repo>:<tag>',
    summary:
      'upload a built image (a directory), a frozen template (a name: its record, device state and RAM in 2 MiB chunks, zero chunks left out, chunks the registry has not sent again) or a hibernated clone (its saved state, its template with it by digest) as one OCI artifact (credentials: ~/.docker/config.json or $DOCKER_CONFIG)',
    options: { ...INSECURE },
    cleansUpOnInterrupt: true,
    async run(pos, v, ctx) {
      need(pos, 2, 'push', 'scion push out/web 127.0.0.1:5000/scion/web:1.0, or scion push web-tpl 127.0.0.1:5000/scion/web-tpl:1');
      const log = ctx.json ? undefined : (m: string) => ctx.err(`[push] ${m}`);
      // a bad or unreadable name falls through to the template push, which says what is wrong with it
      const named = isDirectory(pos[0]) ? undefined : await Machine.find(pos[0]).catch(() => undefined);
      if (named?.info().role === 'clone') {
        const r = await pushHibernated(pos[0], pos[1], { insecure: !!v.insecure, log });
        ctx.out(
          ctx.json
            ? JSON.stringify({ ok: true, kind: 'hibernated', ...r }, null, 2)
            : `pushed ${r.reference}\n  saved state ${fmtBytes(r.stateBytes)}; its template ${r.template.name} as ${r.template.digest} (${fmtBytes(r.template.bytesSent)} sent for it); ${fmtBytes(r.bytesSent)} sent in all`,
        );
        return EXIT.ok;
      }
      if (!isDirectory(pos[0])) {
        const r = await pushTemplate(pos[0], pos[1], { insecure: !!v.insecure, log });
        ctx.out(
          ctx.json
            ? JSON.stringify({ ok: true, kind: 'template', ...r }, null, 2)
            : `pushed ${r.reference}
  RAM: ${r.chunks.total} chunks of 2 MiB, ${r.chunks.zero} zero (left out), ${r.chunks.sent} sent, ${r.chunks.reused} the registry had
  ${fmtBytes(r.bytesSent)} sent of a ${fmtBytes(r.artifactBytes)} artifact`,
        );
        return EXIT.ok;
      }
      const r = await push(pos[0], pos[1], { insecure: !!v.insecure, log });
      ctx.out(
        ctx.json
          ? JSON.stringify({ ok: true, ...r }, null, 2)
          : `pushed ${r.reference}\n  uploaded: ${r.uploaded.join(', ') || 'nothing (the registry had every blob)'}; already there: ${r.skipped.join(', ') || 'none'}`,
      );
      return EXIT.ok;
    },
  },
  {
    name: 'pull',
    args: '<registry>/<repo>:<tag>|@sha256:…',
    summary:
      'download and verify an image into DIR/<name>/ (up and boot take the reference too), a template snapshot as a frozen template fork takes, or a hibernated clone (its template with it) that `scion resume` brings up',
    options: {
      out: { type: 'string', value: 'DIR', help: 'where an image goes (default ./out)' },
      name: { type: 'string', value: 'NAME', help: "a template snapshot's or a hibernated clone's name here (default: the name it was pushed with)" },
      ...INSECURE,
    },
    cleansUpOnInterrupt: true,
    async run(pos, v, ctx) {
      need(pos, 1, 'pull', 'scion pull 127.0.0.1:5000/scion/web:1.0 --out images-dir');
      const log = ctx.json ? undefined : (m: string) => ctx.err(`[pull] ${m}`);
      const kind = await snapshotKindOf(pos[0], { insecure: !!v.insecure });
      if (kind === 'hibernated') {
        const r = await pullHibernated(pos[0], { name: str(v, 'name'), insecure: !!v.insecure, log });
        ctx.out(
          ctx.json
            ? JSON.stringify({ ok: true, kind, ...r }, null, 2)
            : `pulled ${r.reference} -> hibernated clone ${r.name} (its template ${r.template.name}${r.template.pulled ? ', pulled now' : ', here already'}; every digest checked); scion resume ${r.name}`,
        );
        return EXIT.ok;
      }
      if (kind === 'template') {
        const r = await pullTemplate(pos[0], { name: str(v, 'name'), insecure: !!v.insecure, log });
        ctx.out(
          ctx.json
            ? JSON.stringify({ ok: true, kind: 'template', ...r }, null, 2)
            : `pulled ${r.reference} -> template ${r.name} (${r.chunks} RAM chunks, ${fmtBytes(r.bytesReceived)}, every digest checked); scion fork ${r.name}`,
        );
        return EXIT.ok;
      }
      const r = await pull(pos[0], str(v, 'out') ?? 'out', { insecure: !!v.insecure, log });
      ctx.out(ctx.json ? JSON.stringify({ ok: true, ...r }, null, 2) : `pulled ${r.reference} -> ${r.dir} (every digest checked)`);
      return EXIT.ok;
    },
  },
];
