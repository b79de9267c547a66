#!/bin/sh
# Run by the scion-node DaemonSet's init container, with the host's root at $HOST and the scion
# install (a Node runtime and the scion package) at /opt/scion in the image. Idempotent; every
# file lands by rename, so a node never sees half an install. SCION_SHIM_TEMPLATE,
# SCION_SHIM_IMAGES and SCION_SHIM_POOL (from the DaemonSet's ConfigMap) become the shim's environment.
set -eu
HOST=${HOST:-/host}
SRC=${SRC:-/opt/scion}
DEST="$HOST/opt/scion"
TEMPLATE=${SCION_SHIM_TEMPLATE:-pod-tpl}
IMAGES=${SCION_SHIM_IMAGES:-}
POOL=${SCION_SHIM_POOL:-1}
# they go into a script run as root for every pod: only the characters names and references use
for v in "$TEMPLATE" "$IMAGES"; do
  case "$v" in *[!A-Za-z0-9._:/,@-]*) echo "install-node.sh: refusing \"$v\": a template name or reference prefixes are letters, digits and . _ : / , @ -" >&2; exit 2;; esac
done
case "$POOL" in ''|*[!0-9]*) echo "install-node.sh: refusing SCION_SHIM_POOL \"$POOL\": a number of VMs, 0 to 16" >&2; exit 2;; esac
[ "$POOL" -le 16 ] || { echo "install-node.sh: refusing SCION_SHIM_POOL $POOL: at most 16" >&2; exit 2; }
mkdir -p "$HOST/opt" && rm -rf "$DEST.new" && cp -a "$SRC" "$DEST.new"
rm -rf "$DEST.old" && { [ ! -e "$DEST" ] || mv "$DEST" "$DEST.old"; } && mv "$DEST.new" "$DEST" && rm -rf "$DEST.old"
# containerd finds the shim on its PATH: the packaged (compiled) shim, run by the packaged Node
mkdir -p "$HOST/usr/local/bin"
cat > "$HOST/usr/local/bin/containerd-shim-scion-v2.new" <<SH
#!/bin/sh
export SCION_SHIM_TEMPLATE='$TEMPLATE' SCION_SHIM_IMAGES='$IMAGES' SCION_SHIM_POOL='$POOL'
exec /opt/scion/node/bin/node /opt/scion/lib/node_modules/scion/bin/containerd-shim-scion-v2 "\$@"
SH
chmod 0755 "$HOST/usr/local/bin/containerd-shim-scion-v2.new"
mv "$HOST/usr/local/bin/containerd-shim-scion-v2.new" "$HOST/usr/local/bin/containerd-shim-scion-v2"
# the runtime `scion` for the node's containerd (its main config imports /etc/containerd/conf.d/*.toml)
mkdir -p "$HOST/etc/containerd/conf.d"
conf=containerd-scion.toml
if chroot "$HOST" containerd --version | grep -Eq ' v?2\.'; then conf=containerd-scion-v3.toml; fi
cp "$SRC/lib/node_modules/scion/deploy/kubernetes/$conf" "$HOST/etc/containerd/conf.d/scion.toml.new"
mv "$HOST/etc/containerd/conf.d/scion.toml.new" "$HOST/etc/containerd/conf.d/scion.toml"
