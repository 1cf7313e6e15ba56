"""Engine doubles for cluster tests, injected from Python, never by YAML.

FakeEngine (fake_engine.py: EngineProtocol without a model) reaches the replicas as
`build_app(config, engine_factory=...)` (cluster/app.py): a callable bound into the LLMServer
deployment's arguments, which no YAML file or RayService can name. Ray Serve pickles those
arguments (cloudpickle) and the replicas unpickle them in processes whose sys.path lacks tests/,
so `engine_factory(module)` registers the module to be pickled by value — its code travels with
the arguments — and returns its `from_model_section`.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any


def engine_factory(module: ModuleType) -> Callable[[Any], Any]:
    """`module.from_model_section`, with `module` pickled by value when Serve ships it to replicas."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(module)
    return module.from_model_section
