"""The Helm chart's values.schema.json, generated: the chart's own values plus the serve config.

Data flow: `chart_schema(base)` takes the chart's hand-written part (helm/shardserve/
values.schema.base.json: image, workerGroups, tls Secret, ... — values only the templates read)
and fills its `shardserve` property from `AppConfig.model_json_schema()`, the same pydantic models
that parse YAML (cluster/config.py, engine sections generated from workers/config.py). Helm
validates with draft-07, so pydantic's `$defs` are inlined and `X | None` becomes a type list, an
enum with null, or a oneOf. The base's `shardserve` entry is an overlay merged on top (chart-only
requirements and descriptions, e.g. `source` required). `shardserve config helm-schema --write`
rewrites the committed file; tests/helm checks that the committed file equals the generated one.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

BASE_NAME = "values.schema.base.json"
SCHEMA_NAME = "values.schema.json"
_DROP = ("title",)


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """Resolve $refs, drop titles and rewrite nullable forms, recursively."""
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[1]]
        rest = {k: v for k, v in node.items() if k != "$ref"}
        return _inline({**target, **rest}, defs)
    out = {k: _inline(v, defs) for k, v in node.items() if k not in _DROP and k != "$defs"}
    options = out.get("anyOf")
    if options and len(options) == 2 and {"type": "null"} in options:
        (other,) = [o for o in options if o != {"type": "null"}]
        del out["anyOf"]
        if "enum" in other:
            out = {**out, **{k: v for k, v in other.items() if k != "type"}, "enum": [None, *other["enum"]]}
        elif other.get("type") in ("string", "integer", "number", "boolean", "array"):
            out = {**out, **other, "type": [other["type"], "null"]}
        else:
            out["oneOf"] = [{"type": "null"}, other]
    return out


def _merge(into: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)
    return into


def serve_schema() -> dict[str, Any]:
    """AppConfig (a serve config without `ray`) as one draft-07 object schema."""
    from shardserve.cluster.config import AppConfig

    schema = AppConfig.model_json_schema()
    return _inline(schema, schema.get("$defs", {}))


def chart_schema(base: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    overlay = out["properties"].get("shardserve", {})
    shardserve = serve_schema()
    shardserve.pop("description", None)
    out["properties"]["shardserve"] = _merge(shardserve, overlay)
    return out


def render(chart: Path) -> str:
    base = json.loads((chart / BASE_NAME).read_text())
    return json.dumps(chart_schema(base), indent=2) + "\n"
