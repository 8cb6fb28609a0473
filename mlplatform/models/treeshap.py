"""Exact TreeSHAP for LightGBM models without LightGBM's per-row path recursion: the values
``booster.predict(x, pred_contrib=True)`` returns, 2-4x faster a row, so that a declined
checkout's reasons cost a fraction of what they did.

    shap = FastTreeShap.for_booster(booster)     # None: use pred_contrib (see below)
    contrib = shap.contributions(x)              # (rows, features + 1); the last column is the bias

Why it is exact. LightGBM's (path-dependent) TreeSHAP credits each leaf ``l`` of value ``v``
to the distinct features ``F`` on its path (``d = |F|``). Feature ``j`` has a zero fraction
``z_j`` (the product of the cover ratios of its splits on the path) and a one fraction
``o_j`` (1 if the row satisfies all of ``j``'s splits on the path, else 0). The leaf's share
for feature ``i`` is the Shapley value of the game ``v * prod(o_j for j in U) *
prod(z_j for j not in U)``::

    phi_i = v * (o_i - z_i) * sum_{U subset of F - {i}} w(|U|) * prod_{j in U} o_j * prod_{j in F - {i} - U} z_j

with ``w(k) = k! (d-k-1)! / d!``. Since ``o_j`` is 0 or 1, only ``U`` inside the satisfied
set ``S`` count, and with ``K(A) = sum_{U subset of A} w(|U|) prod_{j in A - U} z_j`` and
``P = prod_{j not in S} z_j``::

    i in S:      phi_i = v * (1 - z_i) * K(S - {i}) * P
    i not in S:  phi_i = -v * K(S) * P

``K(A) = sum_m w(|A| - m) e_m(z_A)`` with ``e_m`` the elementary symmetric polynomials of
A's zero fractions. Two ways to get it, chosen per model when it is loaded:

- **tables** (the "Fast TreeSHAP v2" idea, Yang 2021): ``K`` tabulated once per leaf for all
  ``2^d`` subsets; a row then costs one pass over each leaf's path features. Used while the
  tables fit in ``MAX_TABLE_ENTRIES`` (32 MiB) and no leaf has more than
  ``MAX_TABLE_PATH_FEATURES`` distinct path features: ~4x faster than ``pred_contrib`` on a
  100-tree, 31-leaf model.
- **paths**: ``e_m(z_S)`` computed per row and leaf, ``K(S - {i})`` by unwinding ``z_i`` from
  it; no memory beyond the paths, ~2x faster than ``pred_contrib`` for any size.

Every split is evaluated once a row (LightGBM's ``NumericalDecision``: NaN and zero missing
values, default directions) and each leaf reads its path from those decisions. The bias
column is ``sum_l v_l * cover(l) / cover(root)``, LightGBM's expected value. Results equal
``pred_contrib`` up to floating-point summation order (~1e-15).

``for_booster`` returns None (callers then use ``pred_contrib``) when numba is not installed
or the model has categorical splits or linear trees, averages its trees (random forest) or
has more than one output per iteration.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from typing import Any

import numpy as np

__all__ = ["FastTreeShap"]

log = logging.getLogger(__name__)


#: Above this many table entries (float64, summed over leaves of 2^path features: 32 MiB) a
#: model is explained path by path instead: no tables, ~2x slower, any size.
MAX_TABLE_ENTRIES = 4 << 20
#: ... and so is one with a leaf of more distinct path features than this (building a leaf's
#: table takes 2^d x (d + 1) floats: 9 MiB at 16).
MAX_TABLE_PATH_FEATURES = 16

_MISSING_NONE, _MISSING_ZERO, _MISSING_NAN = 0, 1, 2
_ZERO = 1.0000000180025095e-35  # LightGBM's kZeroThreshold (1e-35f) as a double
_MISSING_TYPES = {"None": _MISSING_NONE, "Zero": _MISSING_ZERO, "NaN": _MISSING_NAN}

_CACHE: weakref.WeakKeyDictionary[Any, FastTreeShap | None] = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


class FastTreeShap:
    """The flattened paths and ``K`` tables of one model (see the module docstring)."""

    def __init__(self, num_features: int, arrays: dict[str, np.ndarray], bias: float) -> None:
        self.num_features = num_features
        self.bias = bias
        self._a = arrays

    @classmethod
    def for_booster(cls, booster: Any) -> FastTreeShap | None:
        """The tables of ``booster`` (built once, cached per booster), or None when this model
        must use ``pred_contrib`` (see the module docstring)."""
        with _CACHE_LOCK:
            if booster in _CACHE:
                return _CACHE[booster]
        shap = _build(booster)
        if shap is not None:  # compile (or load from numba's cache) now, not on a request
            shap.contributions(np.zeros((1, shap.num_features)))
        with _CACHE_LOCK:
            _CACHE[booster] = shap
        return shap

    def contributions(self, x: np.ndarray) -> np.ndarray:
        """SHAP values of each row of ``x`` (rows x model features, float64, NaN = missing):
        shape ``(rows, features + 1)``, the last column the bias, as ``pred_contrib`` gives."""
        x = np.ascontiguousarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected rows of {self.num_features} features, got shape {x.shape}")
        out = np.zeros((x.shape[0], self.num_features + 1))
        a = self._a
        by_tables, by_paths = _kernel()
        nodes = (a["node_feature"], a["node_threshold"], a["node_missing"], a["node_default_left"])
        if "table" in a:
            by_tables(x, out, *nodes, a["leaf_value"], a["leaf_start"], a["leaf_table"], a["uf_feature"], a["uf_z"],
                      a["uf_cond"], a["cond_node"], a["cond_left"], a["table"])
        else:
            by_paths(x, out, *nodes, a["leaf_value"], a["leaf_start"], a["uf_feature"], a["uf_z"], a["uf_cond"],
                     a["cond_node"], a["cond_left"], a["weights"])
        out[:, -1] = self.bias
        return out


# --------------------------------------------------------------------------- building
def _build(booster: Any) -> FastTreeShap | None:
    if _kernel() is None:
        return None
    model = booster.dump_model()
    reason = _unsupported(model)
    if reason is not None:
        log.info("exact fast TreeSHAP not used for this model (%s); reasons use pred_contrib", reason)
        return None
    leaf_value: list[float] = []
    leaf_start = [0]
    uf_feature: list[int] = []
    uf_z: list[float] = []
    uf_cond = [0]
    cond: list[tuple[int, bool]] = []  # (node, went left)
    nodes: list[tuple[int, float, int, bool]] = []  # (feature, threshold, missing type, default left)
    widest = 1
    table_size = 0  # entries the K tables would need: sum over leaves of 2^d
    bias = 0.0
    for tree in model["tree_info"]:
        root = tree["tree_structure"]
        if "leaf_value" in root:  # a single leaf: all of it is bias
            bias += float(root["leaf_value"])
            continue
        root_count = float(root["internal_count"])
        # depth-first walk: (node, path) with path = [(feature, z, condition)]
        stack: list[tuple[dict[str, Any], list[tuple[int, float, tuple[int, bool]]]]] = [(root, [])]
        while stack:
            node, path = stack.pop()
            if "leaf_value" in node:
                value = float(node["leaf_value"])
                bias += value * float(node["leaf_count"]) / root_count
                features: dict[int, list[Any]] = {}
                for feature, z, condition in path:
                    entry = features.setdefault(feature, [1.0, []])
                    entry[0] *= z
                    entry[1].append(condition)
                widest = max(widest, len(features))
                table_size += 1 << min(len(features), 62)
                leaf_value.append(value)
                for feature, (z, conditions) in features.items():
                    uf_feature.append(feature)
                    uf_z.append(z)
                    cond.extend(conditions)
                    uf_cond.append(len(cond))
                leaf_start.append(len(uf_feature))
                continue
            count = float(node["internal_count"])
            feature = int(node["split_feature"])
            nodes.append((feature, float(node["threshold"]), _MISSING_TYPES[node["missing_type"]], bool(node["default_left"])))
            node_id = len(nodes) - 1
            for child, went_left in ((node["left_child"], True), (node["right_child"], False)):
                child_count = float(child["leaf_count"] if "leaf_value" in child else child["internal_count"])
                z = child_count / count if count > 0 else 0.0
                stack.append((child, [*path, (feature, z, (node_id, went_left))]))
    arrays = {
        "leaf_value": np.asarray(leaf_value, dtype=np.float64),
        "leaf_start": np.asarray(leaf_start, dtype=np.int64),
        "uf_feature": np.asarray(uf_feature, dtype=np.int64),
        "uf_z": np.asarray(uf_z, dtype=np.float64),
        "uf_cond": np.asarray(uf_cond, dtype=np.int64),
        "cond_node": np.asarray([c[0] for c in cond], dtype=np.int64),
        "cond_left": np.asarray([c[1] for c in cond], dtype=np.bool_),
        "node_feature": np.asarray([n[0] for n in nodes], dtype=np.int64),
        "node_threshold": np.asarray([n[1] for n in nodes], dtype=np.float64),
        "node_missing": np.asarray([n[2] for n in nodes], dtype=np.int64),
        "node_default_left": np.asarray([n[3] for n in nodes], dtype=np.bool_),
        "weights": _shapley_weights(widest),
    }
    if table_size <= MAX_TABLE_ENTRIES and widest <= MAX_TABLE_PATH_FEATURES:
        starts = arrays["leaf_start"]
        weights = arrays["weights"]
        tabled = [_k_table(arrays["uf_z"][a:b], weights[b - a - 1, : b - a]) for a, b in zip(starts[:-1], starts[1:])]
        arrays["leaf_table"] = np.cumsum([0] + [len(t) for t in tabled[:-1]], dtype=np.int64)
        arrays["table"] = np.concatenate(tabled) if tabled else np.zeros(0)
    return FastTreeShap(int(model["max_feature_idx"]) + 1, arrays, bias)


def _unsupported(model: dict[str, Any]) -> str | None:
    if model.get("num_tree_per_iteration", 1) != 1:
        return "more than one output per iteration"
    if model.get("average_output"):
        return "trees are averaged (random forest)"
    for tree in model["tree_info"]:
        if tree.get("num_cat", 0):
            return "categorical splits"
        stack = [tree["tree_structure"]]
        while stack:
            node = stack.pop()
            if "leaf_value" in node:
                if "leaf_coeff" in node or "leaf_features" in node:
                    return "linear trees"
                continue
            if node.get("decision_type") != "<=":
                return f"decision type {node.get('decision_type')!r}"
            if node.get("missing_type") not in _MISSING_TYPES:
                return f"missing type {node.get('missing_type')!r}"
            stack.extend((node["left_child"], node["right_child"]))
    return None


def _k_table(z: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``K(A)`` for every subset ``A`` (bit ``j`` = path feature ``j``) of a leaf's ``d`` features:
    ``sum_m w(|A| - m) e_m(z_A)``, ``e_m`` the elementary symmetric polynomials of A's zero
    fractions and ``w`` the leaf's Shapley weights (``_shapley_weights``); the subsets holding
    bit ``j`` are built from those below ``2^j``. ``K(F)`` is never used (a satisfied feature
    is taken out first) and is left 0."""
    d = len(z)
    n = 1 << d
    e = np.zeros((n, d + 1))
    e[0, 0] = 1.0
    size = np.zeros(n, dtype=np.int64)
    for j in range(d):
        low, high = 1 << j, 1 << (j + 1)
        e[low:high] = e[:low]
        e[low:high, 1:] += z[j] * e[:low, :-1]
        size[low:high] = size[:low] + 1
    k = size[:, None] - np.arange(d + 1)[None, :]  # |U| = |A| - m for the term e_m
    weights = np.where((k >= 0) & (k < d), np.append(w, 0.0)[np.clip(k, 0, d)], 0.0)
    return (weights * e).sum(axis=1)


def _shapley_weights(widest: int) -> np.ndarray:
    """``weights[d - 1, k] = k! (d - k - 1)! / d! = 1 / (d * C(d - 1, k))`` for paths of ``d``
    distinct features, ``0 <= k < d <= widest``."""
    weights = np.zeros((widest, widest))
    for d in range(1, widest + 1):
        for k in range(d):
            weights[d - 1, k] = 1.0 / (d * math.comb(d - 1, k))
    return weights


# ----------------------------------------------------------------------------- kernel
_KERNEL: Any = None
_KERNEL_LOCK = threading.Lock()


def _kernel() -> Any:
    """The compiled row kernels ``(tables, paths)`` (numba, cached on disk), or None without numba."""
    global _KERNEL
    with _KERNEL_LOCK:
        if _KERNEL is None:
            try:
                import numba
            except ImportError:
                _KERNEL = False
            else:
                global _split_directions, _satisfies
                jit = numba.njit(cache=True, nogil=True)
                # compiled before the kernels that call them
                _split_directions = jit(_split_directions)
                _satisfies = numba.njit(cache=True, nogil=True, inline="always")(_satisfies)  # per path feature: inlined
                _KERNEL = (jit(_rows_tables), jit(_rows_paths))
        return _KERNEL or None


def _split_directions(row, left, node_feature, node_threshold, node_missing, node_default_left):  # pragma: no cover - compiled
    """Every split of the model once for one row: ``left[n]`` is where split ``n`` sends it
    (LightGBM's ``NumericalDecision``); each leaf then reads its path from these."""
    for n in range(node_feature.shape[0]):
        v = row[node_feature[n]]
        missing = node_missing[n]
        if v != v and missing != _MISSING_NAN:  # NaN where NaN is not the missing value counts as 0
            v = 0.0
        if (missing == _MISSING_ZERO and -_ZERO <= v <= _ZERO) or (missing == _MISSING_NAN and v != v):
            left[n] = node_default_left[n]
        else:
            left[n] = v <= node_threshold[n]


def _satisfies(left, cond_node, cond_left, first, last):  # pragma: no cover - compiled
    """1 if the row goes the path's way at each of a path feature's splits ``first:last``, else 0
    (branch-free: which features a row satisfies is unpredictable)."""
    ok = 1
    for c in range(first, last):
        ok &= left[cond_node[c]] == cond_left[c]
    return ok


def _rows_paths(x, out, node_feature, node_threshold, node_missing, node_default_left,
                leaf_value, leaf_start, uf_feature, uf_z, uf_cond, cond_node, cond_left, weights):  # pragma: no cover - compiled
    left = np.empty(node_feature.shape[0], dtype=np.bool_)
    width = weights.shape[0]
    sat = np.empty(width, dtype=np.bool_)
    zs = np.empty(width)
    e = np.empty(width + 1)
    e_without = np.empty(width + 1)
    for r in range(x.shape[0]):
        row = x[r]
        acc = out[r]
        _split_directions(row, left, node_feature, node_threshold, node_missing, node_default_left)
        for leaf in range(leaf_value.shape[0]):
            first = leaf_start[leaf]
            d = leaf_start[leaf + 1] - first
            s = 0
            p = 1.0
            for u in range(d):
                ok = _satisfies(left, cond_node, cond_left, uf_cond[first + u], uf_cond[first + u + 1])
                sat[u] = ok
                if ok:
                    zs[s] = uf_z[first + u]
                    s += 1
                else:
                    p *= uf_z[first + u]
            # e_m: elementary symmetric polynomials of the satisfied features' zero fractions
            e[0] = 1.0
            for m in range(1, s + 1):
                e[m] = 0.0
            for j in range(s):
                for m in range(j + 1, 0, -1):
                    e[m] += zs[j] * e[m - 1]
            w = weights[d - 1]
            scale = leaf_value[leaf] * p
            if s < d:  # K(S), for the features the row does not satisfy
                k_s = 0.0
                for m in range(s + 1):
                    k_s += w[s - m] * e[m]
                minus = scale * k_s
            else:
                minus = 0.0
            for u in range(d):
                if not sat[u]:
                    acc[uf_feature[first + u]] -= minus
                    continue
                z = uf_z[first + u]
                # K(S - {u}): e without u, unwound from e, then weighted
                e_without[0] = 1.0
                k = w[s - 1]
                for m in range(1, s):
                    e_without[m] = e[m] - z * e_without[m - 1]
                    k += w[s - 1 - m] * e_without[m]
                acc[uf_feature[first + u]] += scale * (1.0 - z) * k


def _rows_tables(x, out, node_feature, node_threshold, node_missing, node_default_left,
                 leaf_value, leaf_start, leaf_table, uf_feature, uf_z, uf_cond, cond_node, cond_left, table):  # pragma: no cover - compiled
    left = np.empty(node_feature.shape[0], dtype=np.bool_)
    for r in range(x.shape[0]):
        row = x[r]
        acc = out[r]
        _split_directions(row, left, node_feature, node_threshold, node_missing, node_default_left)
        for leaf in range(leaf_value.shape[0]):
            # Branch-free on the row's data: which path features it satisfies is unpredictable.
            first = leaf_start[leaf]
            last = leaf_start[leaf + 1]
            satisfied = 0
            p = 1.0
            for u in range(first, last):
                ok = _satisfies(left, cond_node, cond_left, uf_cond[u], uf_cond[u + 1])
                satisfied |= ok << (u - first)
                p *= ok + (1 - ok) * uf_z[u]
            scale = leaf_value[leaf] * p
            base = leaf_table[leaf]
            k_s = table[base + satisfied]
            for u in range(first, last):
                bit = 1 << (u - first)
                sat = (satisfied >> (u - first)) & 1
                acc[uf_feature[u]] += scale * (sat * (1.0 - uf_z[u]) * table[base + (satisfied & ~bit)] - (1 - sat) * k_s)
