"""Aggregates over many half-open intervals at once: the queries behind the window kernel.

Positions are integers ``0..q-1`` (the window kernel's candidate numbers, entity by entity;
no interval crosses an entity's positions); each interval ``[lo, hi)`` carries a value, and
every query answers, for every position at once, an aggregate of the intervals that hold it:

* :func:`count_holding`: how many (+1 at ``lo``, -1 at ``hi``, running total; exact).
* :func:`running_sums`: the sum of their values, compensated and restarted per entity.
* :func:`segment_cover` + :func:`stab`: their sum, min or max, through the canonical nodes
  of a segment tree, one vectorised step per tree level.

Pure numpy (pandas for the grouped compensated sum); nothing here knows about time.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

__all__ = ["Intervals", "count_holding", "running_sums", "segment_cover", "stab"]


class Intervals(NamedTuple):
    """The active events of one window: row ``idx`` holds candidates ``[lo, hi)``; ``closes``
    is False where it is still active after the range (``hi`` is then its entity's end)."""

    idx: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    closes: np.ndarray


def count_holding(lo: np.ndarray, hi: np.ndarray, weights: np.ndarray | None, q: int) -> np.ndarray:
    """How many intervals ``[lo, hi)`` (with weight 1 or 0) hold each candidate ``0..q-1``.

    +1 at ``lo``, -1 at ``hi``, running total: integers, so exact. Every interval closes at
    or before its entity's end, so the running total is back to 0 where an entity begins.
    """
    if weights is not None:
        lo, hi = lo[weights], hi[weights]
    delta = np.bincount(lo, minlength=q + 1) - np.bincount(hi, minlength=q + 1)
    return np.cumsum(delta[:q])


def running_sums(
    inputs: list[tuple[Intervals, np.ndarray]], cand_ent: np.ndarray, q: int
) -> list[np.ndarray]:
    """For each ``(intervals, values of every row)``: the sum of the values of the intervals
    that hold each candidate (NaN skipped).

    +v at ``lo``, -v at ``hi`` where the interval closes inside its entity, running total per
    entity. The total restarts at 0 for every entity and is compensated (Kahan, as pandas'
    grouped cumsum does it), so a value carries no rounding from other entities and next to
    none from the entity's own history.
    """
    if not inputs:
        return []
    deltas = {}
    for i, (iv, column) in enumerate(inputs):
        values = column[iv.idx]
        values = np.where(np.isnan(values), 0.0, values)
        delta = np.bincount(iv.lo, weights=values, minlength=q)
        delta -= np.bincount(iv.hi[iv.closes], weights=values[iv.closes], minlength=q)
        deltas[i] = delta[:q]
    totals = pd.DataFrame(deltas, copy=False).groupby(cand_ent, sort=False).cumsum()
    return [totals[i].to_numpy() for i in range(len(inputs))]


def segment_cover(lo: np.ndarray, hi: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Canonical segment-tree cover of each interval ``[lo, hi)``.

    Returns, per tree level, ``(interval index, node)`` pairs, node ``j`` of level ``L``
    covering ``[j * 2**L, (j + 1) * 2**L)``: the classic bottom-up walk (take ``lo`` when it
    is a right child, ``hi - 1`` when ``hi`` is odd; halve both) run for all intervals at
    once. An interval yields at most two nodes per level, and never crosses its entity's
    candidates, so neither do its nodes.
    """
    out = []
    idx = np.arange(lo.size, dtype=np.int64)
    while idx.size:
        take_lo = (lo & 1) == 1
        take_hi = (hi & 1) == 1
        hi = hi - take_hi
        # Both odd and lo < hi means hi - 1 > lo: the two nodes taken are distinct.
        out.append((np.concatenate([idx[take_lo], idx[take_hi]]), np.concatenate([lo[take_lo], hi[take_hi]])))
        lo = (lo + take_lo) >> 1
        hi = hi >> 1
        keep = lo < hi
        idx, lo, hi = idx[keep], lo[keep], hi[keep]
    return out


def stab(kind: str, pieces: list[tuple[np.ndarray, np.ndarray]], values: np.ndarray, q: int) -> np.ndarray:
    """For every candidate ``0..q-1``: the sum, min or max of the values of the intervals that
    hold it (NaN values skipped; 0 / +inf / -inf where none does).

    The nodes holding candidate ``p`` are node ``p >> L`` of every level ``L``, so each level's
    node table is spread over the candidates with ``repeat`` and combined.
    """
    if kind == "sum":
        acc = np.zeros(q)
        values = np.where(np.isnan(values), 0.0, values)
    else:
        neutral = -np.inf if kind == "max" else np.inf
        acc = np.full(q, neutral)
        values = np.where(np.isnan(values), neutral, values)
    for level, (idx, node) in enumerate(pieces):
        size = (q >> level) + 1
        if kind == "sum":
            table = np.bincount(node, weights=values[idx], minlength=size)
            acc += np.repeat(table, 1 << level)[:q]
        else:
            table = np.full(size, neutral)
            combine = np.maximum if kind == "max" else np.minimum
            combine.at(table, node, values[idx])
            combine(acc, np.repeat(table, 1 << level)[:q], out=acc)
    return acc
