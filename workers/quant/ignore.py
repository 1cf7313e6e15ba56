"""Which modules a quantized checkpoint left in float, from its `quantization_config`.

Each convention is matched as its own library matches it:
  - compressed-tensors `ignore` (llm-compressor): a module's checkpoint name, or `re:<regex>` matched
    from the start (compressed-tensors' `is_match`), e.g. ["lm_head", "re:.*mlp.gate$"]; and the config
    group's `targets`: other than "Linear", only the modules they name (or match) are quantized;
  - GPTQ / AWQ `modules_to_not_convert` (GPTQModel, AutoAWQ, transformers): transformers'
    `should_convert_module` rules (a prefix up to a dot, a regex, or a suffix: ["gate"] is the router);
    optimum's `modules_in_block_to_quantize`: a decoder layer's modules not listed stay float;
  - GPTQModel `dynamic`: `-:<regex>` keys skip the modules they match; per-module overrides
    (`+:` keys or bare regexes with other bits / group sizes) are refused, as one layout serves all.
The loader asks `is_unquantized(name)` with checkpoint names (q_proj, not our merged qkv_proj;
`block_sparse_moe` as Mixtral writes it) and builds those layers, experts included, with float weights.
Routers (`mlp.gate`, `shared_expert_gate`) are float in our models whatever the list says.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from transformers.quantizers.quantizers_utils import should_convert_module

Matcher = Callable[[str], bool]


def unquantized_matcher(entry: dict[str, Any] | None) -> Matcher | None:
    """A predicate true for the checkpoint module names the folder keeps in float, or None if it has none."""
    if entry is None:
        return None
    ignore = [str(p) for p in entry.get("ignore") or ()]
    not_converted = [str(p) for p in entry.get("modules_to_not_convert") or ()]
    dynamic = entry.get("dynamic") or {}
    overrides = [key for key, value in dynamic.items() if not str(key).startswith("-:") and value]
    if overrides:
        raise ValueError(f"quantization_config.dynamic overrides {overrides[:3]} are not supported: one bit "
                         "width and group size must serve every quantized module (only '-:' skip rules are read)")
    skipped = [re.compile(str(key)[2:]) for key in dynamic if str(key).startswith("-:")]
    regexes = [re.compile(p[3:]) for p in ignore if p.startswith("re:")]
    names = {p for p in ignore if not p.startswith("re:")}
    targets = [str(t) for group in (entry.get("config_groups") or {}).values() for t in group.get("targets") or ()]
    targeted = None if not targets or "Linear" in targets else (
        {t for t in targets if not t.startswith("re:")}, [re.compile(t[3:]) for t in targets if t.startswith("re:")])
    in_block = {m for step in entry.get("modules_in_block_to_quantize") or () for m in step}
    if not (ignore or not_converted or skipped or targeted or in_block):
        return None

    def is_unquantized(name: str) -> bool:
        if targeted is not None and not (name in targeted[0] or any(r.match(name) for r in targeted[1])):
            return True
        layer = re.match(r"^model\.layers\.\d+\.(.+)$", name)
        if in_block and layer is not None and layer.group(1) not in in_block:
            return True
        return (name in names or any(r.match(name) for r in regexes) or any(r.match(name) for r in skipped)
                or (bool(not_converted) and not should_convert_module(name, not_converted)))

    return is_unquantized


MERGED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def checkpoint_names(module: str) -> tuple[str, ...]:
    """Our module name -> the checkpoint modules it was merged from (q/k/v, gate/up), as written."""
    head, _, last = module.rpartition(".")
    return tuple(f"{head}.{part}" for part in MERGED[last]) if last in MERGED else (module,)


def all_or_none(names: tuple[str, ...], is_unquantized: Matcher, what: str) -> bool:
    """Whether every one of `names` is unquantized; an error when only some are (one layer, one method)."""
    flags = [is_unquantized(n) for n in names]
    if any(flags) and not all(flags):
        kept = [n for n, f in zip(names, flags, strict=True) if f]
        raise ValueError(f"the checkpoint's ignore list keeps {kept[:3]} in float but quantizes the rest of "
                         f"{what}, which we load as one layer: quantize all of them or none")
    return all(flags)
