#!/usr/bin/env bash
# Installs what scion needs on a Debian 12/13 machine, then the npm packages.
# Idempotent: skips apt when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
pkgs=(qemu-system-x86 qemu-utils gpgv debian-archive-keyring xz-utils zstd cpio libarchive-tools socat iproute2 util-linux ca-certificates curl)
# the test suite's own tools: a real OCI registry and a client that reads it, bcrypt htpasswd for its
# auth, a C compiler for an ELF with debug sections to strip, readelf to check the result
pkgs+=(docker-registry skopeo apache2-utils gcc libc6-dev binutils)
# the containerd runtime (shim/): containerd (with ctr and runc) the tests start on their own
# sockets; the .proto files the shim's messages come from; CNI plugins; erofs for pod rootfs images
pkgs+=(containerd golang-github-containerd-containerd-dev golang-github-containerd-ttrpc-dev golang-github-containerd-cgroups-dev golang-gogoprotobuf-dev golang-google-genproto-dev containernetworking-plugins erofs-utils)
# the DHCP test runs busybox's udhcpd on the host; either busybox package will do
command -v busybox >/dev/null || pkgs+=(busybox)
missing=()
for p in "${pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ] || [ "${CI:-}" = true ]; then
  sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
  echo "[setup] apt-get install ${missing[*]:-(refresh)}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
fi
node -e 'const [a,b]=process.versions.node.split(".").map(Number); if (a<20||(a===20&&b<19)) { console.error("scion needs Node >= 20.19, found "+process.version); process.exit(1) }'
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "[setup] npm ci" >&2
  npm ci --no-audit --no-fund >&2
fi
# the QEMU scion runs: the closure vmm/qemu.scion.lock pins (Debian trixie's qemu-system-x86), fetched,
# checked and extracted once (a no-op when it is there); SCION_VMM=system runs the host's QEMU instead
node bin/scion.js vmm fetch >&2
