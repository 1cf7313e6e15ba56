"""Pydantic YAML sections generated from the engine's config dataclasses (workers/config.py).

Data flow: `engine_section(ParallelConfig)` reads `dataclasses.fields()` and their metadata
(description, ge/gt/le/lt, min_length, pattern) and builds a pydantic model with the same names, types, defaults,
descriptions and ranges, so the YAML schema, `shardserve config schema` and the Helm values schema
(cluster/helm_schema.py) never restate an engine field. After pydantic has checked types and ranges
(errors name the field path), the section's validator builds the dataclass itself, so every
cross-field rule of its `__post_init__` runs at `config validate` time with the engine's message.
A section class may declare a field itself to narrow it for YAML (e.g. an enum); the engine check
still runs on the value.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from shardserve.workers.config import RULES, field_default


class EngineSection(BaseModel):
    """A YAML section that mirrors one engine dataclass (see engine_section)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    engine_class: ClassVar[type]
    renames: ClassVar[dict[str, str]] = {}  # engine field name -> YAML name

    def engine_kwargs(self) -> dict[str, Any]:
        """The dataclass's keyword arguments: every engine field this section has."""
        out = {}
        for f in dataclasses.fields(self.engine_class):
            name = self.renames.get(f.name, f.name)
            if name in type(self).model_fields:
                out[f.name] = getattr(self, name)
        return out

    def to_engine(self) -> Any:
        return self.engine_class(**self.engine_kwargs())

    @model_validator(mode="after")
    def _engine_rules(self) -> EngineSection:
        self.to_engine()  # the engine's __post_init__: its rules and messages, in one place
        return self


def engine_section(engine_class: type, name: str, *, renames: dict[str, str] | None = None,
                   skip: tuple[str, ...] = ()) -> type[EngineSection]:
    """A pydantic section with one field per dataclass field of `engine_class` (but `skip`)."""
    renames = renames or {}
    hints = typing.get_type_hints(engine_class)
    definitions: dict[str, Any] = {}
    for f in dataclasses.fields(engine_class):
        if f.name in skip:
            continue
        if "description" not in f.metadata:
            raise TypeError(f"{engine_class.__name__}.{f.name} has no description (use workers.config.setting)")
        rules = {key: f.metadata[key] for key in RULES if key in f.metadata}
        definitions[renames.get(f.name, f.name)] = (
            hints[f.name], Field(field_default(f), description=f.metadata["description"], **rules))
    section = create_model(name, __base__=EngineSection, __doc__=engine_class.__doc__, **definitions)
    section.engine_class = engine_class
    section.renames = renames
    return section
