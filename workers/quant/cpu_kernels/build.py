"""Builds and loads the C++ extension (kernels.cpp + body.inc) once per process.

`torch.utils.cpp_extension.load` compiles into torch's extensions folder (TORCH_EXTENSIONS_DIR,
by default ~/.cache/torch_extensions) keyed by a hash of the sources, so a rebuild happens only
when the C++ changes, and concurrent processes wait on its lock. torch hashes only the listed
source, not the files it includes (kernels.cpp, body.inc), so the name carries a hash of every
.cpp / .inc here: checkouts with different kernels never load each other's build. torch's own loader was chosen
over a setup.py extension so an editable install and CI need no compile step. No -mavx* flags
are passed: kernels.cpp compiles its AVX2 and AVX512-VNNI variants with per-function targets and
picks one at run time. A failed build raises `CpuKernelsUnavailable`; callers fall back to torch ops.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
EXTENSION_NAME = "shardserve_quant_cpu_v2"
log = logging.getLogger(__name__)


class CpuKernelsUnavailable(RuntimeError):
    """The quantized CPU kernels could not be built or loaded on this machine."""


@functools.cache
def extension() -> ModuleType:
    return build(HERE / "kernels.cpp", EXTENSION_NAME)


def build(source: Path, name: str) -> ModuleType:
    try:
        from torch.utils import cpp_extension

        return cpp_extension.load(name=f"{name}_{_sources_hash(source.parent)}", sources=[str(source)], extra_cflags=["-O3"],
                                  extra_include_paths=[str(source.parent)], verbose=False)
    except Exception as exc:  # compiler missing, ninja missing, compile error: all mean "use the fallback"
        raise CpuKernelsUnavailable(f"building the quantized CPU kernels ({source}) failed: "
                                    f"{type(exc).__name__}: {exc}") from exc


@functools.cache
def _sources_hash(folder: Path) -> str:
    digest = hashlib.sha1()
    for path in sorted((*folder.glob("*.cpp"), *folder.glob("*.inc"))):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:10]


def build_or_none(source: Path, name: str, fallback: str) -> ModuleType | None:
    """`build`, or None after a warning that says what the caller falls back to."""
    try:
        return build(source, name)
    except CpuKernelsUnavailable as exc:
        log.warning("%s; %s", exc, fallback)
        return None
