"""Deterministic synthetic buy-now-pay-later data: applicants, merchants, loans, the repayment
ledger, the checkout and repayment event streams (event ids, stamped with when each fact became
known), and default outcomes.

    config = DataConfig(applications=1_000_000, seed=7)
    versions = generate(platform, config)    # Ray Data: each shard writes its own Parquet files
    tables = generate_shard(config, 0)       # the same rows of shard 0, in this process, no Ray

This module holds the entry points: the config, how the work is cut into shards, and the Ray
job that writes them. What each table holds is documented in ``workloads.underwriting.tables``
(with ``SCHEMAS``); the hidden model the rows come from, in ``workloads.underwriting.population``.

Determinism: the same config gives byte-identical tables. Randomness comes from blocks of
``BLOCK_APPLICATIONS`` applications, each seeded by ``SeedSequence(seed, spawn_key=(1, block))``
(merchants: ``spawn_key=(0,)``), and shards are contiguous runs of blocks, so the data does not
depend on how many shards generate it.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from workloads.underwriting.population import _CAT_NAMES, _MEAN_LOANS, CATEGORIES, _draw_block, _merchant_model
from workloads.underwriting.tables import (
    DEFAULT_DPD,
    GRACE,
    KNOWN_AFTER_DECISION,
    OUTCOME_HORIZON,
    SCHEMAS,
    SHARD_TABLES,
    TABLES,
    _tables,
)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import pyarrow.fs as pafs

    from mlplatform.platform import Platform
    from mlplatform.storage import DatasetVersion

__all__ = [
    "BLOCK_APPLICATIONS",
    "CATEGORIES",
    "DEFAULT_DPD",
    "GRACE",
    "KNOWN_AFTER_DECISION",
    "OUTCOME_HORIZON",
    "SCHEMAS",
    "TABLES",
    "DataConfig",
    "generate",
    "generate_merchants",
    "generate_shard",
    "shard_count",
]

APPLICATIONS_PER_SHARD = 250_000
BLOCK_APPLICATIONS = 1024


class DataConfig(BaseModel):
    """Size, period and seed of the synthetic data set (``data:`` in configs/underwriting.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    applications: int = Field(default=20_000, gt=0, le=999_999_999, description="Number of loan applications.")
    merchants: int = Field(default=200, gt=0, le=1_000_000, description="Number of merchants.")
    start: datetime = Field(
        default=None,  # type: ignore[assignment]  # filled in from end by _period
        description="First possible signup/application (UTC; naive = UTC); default two years before end.",
    )
    end: datetime = Field(
        default=datetime(2025, 1, 1, tzinfo=UTC),
        description=(
            "The data's 'now' (exclusive for applications): nothing known later is written (UTC; naive = UTC). "
            "'today' = this UTC midnight, so the online features of a live endpoint are within their ttl "
            "(the data then changes daily; give a date for a reproducible set)."
        ),
    )
    seed: int = Field(default=7, ge=0, description="Random seed: the same config gives byte-identical tables.")
    shards: int | None = Field(
        default=None,
        gt=0,
        description=f"Parallel pieces (None = one per ~{APPLICATIONS_PER_SHARD:,} applications); the data is the same.",
    )
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$", description="ISO 4217 currency of every amount.")

    @field_validator("end", mode="before")
    @classmethod
    def _today(cls, value: Any) -> Any:
        if value == "today":
            return datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        return value

    @field_validator("start", "end")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    @model_validator(mode="after")
    def _period(self) -> DataConfig:
        if self.start is None:
            end = self.end
            start = end.replace(year=end.year - 2, day=28 if (end.month, end.day) == (2, 29) else end.day)
            object.__setattr__(self, "start", start)  # frozen model: set once, while validating
        if self.end - self.start < timedelta(days=1):
            raise ValueError(
                f"end ({self.end.isoformat()}) must be at least one day after start ({self.start.isoformat()})"
            )
        return self


# ------------------------------------------------------------------------------ layout
def _blocks(config: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Offsets of each block's applications and applicants (arrays of n_blocks + 1)."""
    n_blocks = math.ceil(config.applications / BLOCK_APPLICATIONS)
    app_off = np.arange(n_blocks + 1, dtype=np.int64) * config.applications // n_blocks
    applicants = np.maximum(1, np.rint(np.diff(app_off) / _MEAN_LOANS)).astype(np.int64)
    return app_off, np.concatenate([[0], np.cumsum(applicants)])


def shard_count(config: DataConfig) -> int:
    """How many shards ``generate`` runs: ``config.shards`` (or one per ~250k applications),
    at most one per block of ``BLOCK_APPLICATIONS`` applications."""
    n_blocks = math.ceil(config.applications / BLOCK_APPLICATIONS)
    wanted = config.shards or math.ceil(config.applications / APPLICATIONS_PER_SHARD)
    return max(1, min(wanted, n_blocks))


# ------------------------------------------------------------------------ entry points
def generate_merchants(config: DataConfig) -> pa.Table:
    """The merchants table (ids 1..merchants in onboarding order); depends only on the seed,
    the number of merchants and the period."""
    model = _merchant_model(config)
    schema = SCHEMAS["merchants"]
    return pa.table(
        [
            pa.array(np.arange(1, config.merchants + 1, dtype=np.int64)),
            pa.array(np.array(_CAT_NAMES, dtype=object)[model["category"]], pa.string()),
            pa.array(model["onboarded"], schema.field("onboarded_ts").type),
        ],
        schema=schema,
    )


def generate_shard(config: DataConfig, shard: int) -> dict[str, pa.Table]:
    """Tables ``applicants``, ``applications``, ``checkout_events``, ``installments``,
    ``repayment_events`` and ``outcomes`` for the applicants of ``shard`` (0 <= shard < ``shard_count(config)``).

    Pure: no Ray, no I/O. Shards partition the applicants (and so everything else); the
    concatenation of every shard is the data set, whatever the number of shards.

    Raises:
        ValueError: ``shard`` is out of range.
    """
    n_shards = shard_count(config)
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} out of range: this config has {n_shards} shards (0..{n_shards - 1})")
    app_off, appl_off = _blocks(config)
    n_blocks = len(app_off) - 1
    lo, hi = shard * n_blocks // n_shards, (shard + 1) * n_blocks // n_shards
    parts = [
        _draw_block(config, b, int(appl_off[b + 1] - appl_off[b]), int(app_off[b + 1] - app_off[b]))
        for b in range(lo, hi)
    ]
    local = np.concatenate([[0], np.cumsum([len(p["risk"]) for p in parts])])
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    cat["owner"] = np.concatenate([p["owner"] + local[i] for i, p in enumerate(parts)])
    return _tables(config, cat, first_applicant=int(appl_off[lo]) + 1, first_application=int(app_off[lo]) + 1)


# ------------------------------------------------------------------------------- Ray
def _write_shards(
    batch: dict[str, np.ndarray], *, config: DataConfig, filesystem: pafs.FileSystem, paths: dict[str, str]
) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    stats: dict[str, list] = {"shard": [], "seconds": [], **{t: [] for t in SHARD_TABLES}}
    for shard in batch["id"].tolist():
        started = time.perf_counter()
        for name, table in generate_shard(config, shard).items():
            # A retried task rewrites the same file name, so a retry cannot duplicate rows.
            pq.write_table(table, f"{paths[name]}/shard-{shard:05d}.parquet", filesystem=filesystem)
            stats[name].append(table.num_rows)
        stats["shard"].append(shard)
        stats["seconds"].append(time.perf_counter() - started)
    return {k: np.asarray(v) for k, v in stats.items()}


def generate(platform: Platform, config: DataConfig, *, prefix: str = "raw/underwriting") -> dict[str, DatasetVersion]:
    """Generate the data set with Ray Data and publish each table as a new dataset version.

        versions = generate(platform, DataConfig(applications=1_000_000))
        platform.datasets.read("raw/underwriting/repayment_events")

    Each of ``shard_count(config)`` Ray tasks generates one shard (memory is bounded by a
    shard, ~250k applications by default) and writes one Parquet file per table under that
    table's staging folder; then every table is committed, so readers never see part of a run.
    Works the same with the storage root on local disk or on S3. Each manifest's metadata holds
    ``data_config`` (the config as JSON), ``rows`` and ``shards``. Logs one summary line
    (DEBUG): rows per table, seconds, the fastest and slowest shard.

    Returns:
        ``{table: DatasetVersion}`` for every table in ``TABLES``, named ``f"{prefix}/{table}"``.
    """
    ray = platform.ray()
    started = time.perf_counter()
    n_shards = shard_count(config)
    meta = {"data_config": json.loads(config.model_dump_json()), "generator": __name__, "shards": n_shards}
    staged = {t: platform.datasets.begin(f"{prefix}/{t}") for t in SHARD_TABLES}
    for write in staged.values():
        platform.storage.arrow_fs.create_dir(write.path, recursive=True)
    # The pyarrow filesystem, not the Storage, travels to the tasks: it carries static
    # credentials from this process's environment, which the workers may not have.
    fn = functools.partial(
        _write_shards, config=config, filesystem=platform.storage.arrow_fs, paths={t: w.path for t, w in staged.items()}
    )
    stats = (
        ray.data.range(n_shards, override_num_blocks=n_shards)
        .map_batches(fn, batch_size=1, batch_format="numpy")
        .take_all()
    )
    if sorted(int(s["shard"]) for s in stats) != list(range(n_shards)):
        done = sorted(int(s["shard"]) for s in stats)
        raise RuntimeError(f"generation returned shards {done}, expected 0..{n_shards - 1}")
    rows = {t: sum(int(s[t]) for s in stats) for t in SHARD_TABLES}
    versions = {
        "merchants": platform.datasets.publish(
            f"{prefix}/merchants", generate_merchants(config), metadata={**meta, "rows": config.merchants}
        )
    }
    for table, write in staged.items():
        versions[table] = write.commit(metadata={**meta, "rows": rows[table]})
    elapsed = time.perf_counter() - started
    shard_s = [float(s["seconds"]) for s in stats]
    log.debug(
        "generated %s applications in %d shards in %.1fs (a shard %.1f-%.1fs) under %s: %s",
        f"{config.applications:,}", n_shards, elapsed, min(shard_s), max(shard_s), platform.storage.uri(prefix),
        ", ".join(f"{t} {versions[t].rows:,}" for t in TABLES),
    )
    return {t: versions[t] for t in TABLES}
