"""Short full garbage collections while serving: the start-up heap is frozen.

Why: a process that imports torch and builds an engine holds a few hundred thousand objects that
live as long as it does. Every full (generation 2) collection walks all of them, a pause of a
fraction of a second that stalls a step; under pipeline parallelism a stalled driver or stage
stalls the whole pipeline (figures: benchmarks/README.md, "Figures behind the code").
After start-up, `freeze_startup_heap` collects once and moves every surviving object into the
permanent generation (`gc.freeze`, as CPython documents for long-running servers), so later full
collections only walk objects made while serving. Reference counting still frees frozen objects;
only cycles among them wait for `thaw_heap`, which an engine calls at shutdown so a process that
builds many engines (tests, notebooks) can collect the old ones.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect, then freeze everything alive; returns the number of frozen objects."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def thaw_heap() -> None:
    """Back into the oldest generation: the next full collection may free cycles among them."""
    gc.unfreeze()
