#!/usr/bin/env bash
# .vparts/p00 ... for the device (vLLM 0.24 and its closure, see ../shared/device/README.md), with
# xgrammar pinned to 0.2.3: the closure script takes the newest xgrammar (0.2.8), which needs
# apache-tvm-ffi >= 0.1.11 while vLLM 0.24 pins 0.1.9, and `import vllm` then fails in xgrammar
# (`load_lib_module() got an unexpected keyword argument 'extra_lib_paths'`). 0.2.3 needs >= 0.1.9.
# Run from the repo root; needs network access to PyPI (this machine's pip).
set -euo pipefail
../shared/device/make-vllm-parts.sh
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
cat .vparts/p*/part.* | tar -C "$tmp" -xf -
rm -f "$tmp"/sel/xgrammar-*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 -d "$tmp/sel" "xgrammar==0.2.3"
rm -rf .vparts && mkdir -p .vparts "$tmp/split"
tar -C "$tmp" -cf - sel | split -b 58m -d - "$tmp/split/part."
for p in "$tmp"/split/part.*; do n=${p##*.}; mkdir -p ".vparts/p$n"; mv "$p" ".vparts/p$n/"; done
ls .vparts
