"""A torch module's forward recorded once per hot input shape (``torch.jit.trace``), for the
small fixed-shape calls a model server repeats.

    forward = ShapeGraphs(module)          # module.trace_safe must be True (see below)
    raw = forward(tensors)                 # eager until a shape is hot, then its recorded graph

Why: a small model's eager forward is mostly Python dispatch. The fraud transformer (9,857
parameters, one torch thread, 8 rows) takes 0.80 ms eager and 0.37 ms as a recorded graph,
with outputs equal bit for bit (the same ATen kernels run in the same order, without the
Python between them). A decision scores its rule models in one shape (``DECISION_ROWS``), so
that shape becomes hot at once.

When a graph is used:

- only for a module whose class sets ``trace_safe = True``: its author's statement that
  ``forward`` has no control flow that depends on input *values* (a trace records one path
  and replays it for every input). Other modules always run eagerly;
- a shape (every input's name, shape and dtype) is recorded on its ``HOT_AFTER``-th call, so
  one-off shapes — batch scoring's last, shorter batch — never pay for a trace (~20-60 ms);
- the recording must give the eager outputs of that call exactly (``torch.equal``), else the
  shape stays eager for good and a warning says so;
- at most ``MAX_GRAPHS`` shapes are tried per module (kept or left eager); others run eagerly.

Because a graph's outputs equal eager outputs bit for bit, replay (which may score a row
eagerly, in a process where that shape is not hot) recomputes a served score exactly.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections import Counter
from typing import Any

__all__ = ["HOT_AFTER", "MAX_GRAPHS", "ShapeGraphs", "traceable"]

log = logging.getLogger(__name__)

HOT_AFTER = 3
MAX_GRAPHS = 8
_MAX_COUNTED = 1024  # distinct shapes counted before the counts start over


def traceable(module: Any) -> bool:
    """Whether ``module``'s class declares its forward free of value-dependent control flow."""
    return getattr(type(module), "trace_safe", False) is True


class ShapeGraphs:
    """``module(**tensors)``, run from a recorded graph for hot shapes (see the module docstring).

    Thread-safe: calls may come from several threads; a shape is recorded once.
    """

    def __init__(self, module: Any, *, hot_after: int = HOT_AFTER, max_graphs: int = MAX_GRAPHS) -> None:
        self.module = module
        self.hot_after = hot_after
        self.max_graphs = max_graphs
        self._graphs: dict[tuple[Any, ...], Any] = {}  # shape -> graph, or None: stays eager
        self._calls: Counter[tuple[Any, ...]] = Counter()
        self._lock = threading.Lock()

    @property
    def recorded(self) -> int:
        """How many shapes run from a graph."""
        return sum(g is not None for g in self._graphs.values())

    def __call__(self, tensors: dict[str, Any]) -> Any:
        key = tuple((name, tuple(t.shape), t.dtype) for name, t in tensors.items())
        graph = self._graphs.get(key)
        if graph is not None:
            try:
                return graph(**tensors)
            except Exception:  # noqa: BLE001 -- e.g. an id past an embedding: eager raises it as the caller expects
                pass
        raw = self.module(**tensors)
        if key not in self._graphs and self._due(key):
            self._graphs[key] = self._record(tensors, raw)
        return raw

    def _due(self, key: tuple[Any, ...]) -> bool:
        with self._lock:
            if len(self._graphs) >= self.max_graphs:
                return False
            if len(self._calls) >= _MAX_COUNTED:
                self._calls.clear()
            self._calls[key] += 1
            if self._calls[key] != self.hot_after:
                return False
            self._graphs[key] = None  # claimed: another thread runs eagerly meanwhile
            return True

    def _record(self, tensors: dict[str, Any], expected: Any) -> Any:
        import torch

        name = type(self.module).__name__
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TracerWarnings about the path taken: what trace_safe vouches for
                graph = torch.jit.trace(self.module, example_kwarg_inputs=tensors, check_trace=False, strict=False)
            again = graph(**tensors)
        except Exception as exc:  # noqa: BLE001 -- any failure to record leaves the shape eager
            log.warning("%s: cannot record its forward for shape %s (%r); it runs eagerly", name, _shapes(tensors), exc)
            return None
        if not _equal(expected, again):
            log.warning("%s: the recorded forward differs from eager for shape %s; it runs eagerly", name, _shapes(tensors))
            return None
        return graph


def _equal(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return False


def _shapes(tensors: dict[str, Any]) -> dict[str, list[int]]:
    return {name: list(t.shape) for name, t in tensors.items()}
