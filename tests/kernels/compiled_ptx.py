"""Compile a kernel of this package for an H100 (sm_90) without a GPU and look at its PTX.

The kernel tests run under Triton's interpreter, which cannot compile, so the compile happens in
a fresh Python process without TRITON_INTERPRET. Tests use this to check what the interpreter
cannot show: vector widths, cache policies, predication of the memory instructions.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable

_COMPILE_FOR_H100 = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
for spec in json.loads(sys.argv[1]):
    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    names = fn.arg_names
    constexprs = {n: v for n, v in spec["constexprs"].items() if n in names}
    def arg_type(n):
        if n in constexprs:
            return "constexpr"
        return spec["pointers"].get(n) or ("fp32" if n in spec["floats"] else "i32")
    signature = {n: arg_type(n) for n in names}
    source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(n),): v for n, v in constexprs.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in spec["aligned"] if n in names})
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": spec["num_warps"]}).asm["ptx"]
    print("PTX " + json.dumps(ptx), flush=True)
"""


def compile_ptx(module: str, kernel: str, *, pointers: dict[str, str], constexprs: dict[str, object],
                aligned: Iterable[str] = (), floats: Iterable[str] = (), num_warps: int = 4) -> str:
    """PTX of `module.kernel` compiled for sm_90. Arguments not named in `pointers` (name -> "*bf16",
    "*i64", ...), `constexprs` or `floats` (fp32 scalars) are i32 scalars; those in `aligned` are
    specialised as divisible by 16, as a launch with 16-byte aligned pointers and sizes would be."""
    return compile_ptx_all([ptx_spec(module, kernel, pointers=pointers, constexprs=constexprs, aligned=aligned,
                                     floats=floats, num_warps=num_warps)])[0]


def ptx_spec(module: str, kernel: str, *, pointers: dict[str, str], constexprs: dict[str, object],
             aligned: Iterable[str] = (), floats: Iterable[str] = (), num_warps: int = 4) -> dict:
    """One kernel to compile (compile_ptx's arguments)."""
    return {"module": module, "kernel": kernel, "pointers": pointers, "constexprs": constexprs,
            "aligned": sorted(aligned), "floats": sorted(floats), "num_warps": num_warps}


def compile_ptx_all(specs: list[dict]) -> list[str]:
    """PTX of each `ptx_spec`, compiled in one fresh process (one torch + Triton import for all)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FOR_H100, json.dumps(specs)], capture_output=True,
                          text=True, env=env, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PTX ")]
    assert proc.returncode == 0 and len(lines) == len(specs), proc.stderr[-2000:]
    return [json.loads(line[4:]) for line in lines]


def memory_ops(ptx: str) -> Counter[str]:
    """Count of each load / store / atomic opcode with its qualifiers (e.g. `ld.global.v4.b32`),
    plus `fence/membar`: the number of fences."""
    ops = Counter(re.findall(r"\b((?:ld|st|atom)(?:\.[A-Za-z0-9_]+(?:::[A-Za-z0-9_]+)?)+)", ptx))
    ops["fence/membar"] = len(re.findall(r"\b(?:fence|membar)\.", ptx))
    return ops
