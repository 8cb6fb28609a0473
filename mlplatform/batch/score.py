"""Batch scoring: a registered model over many applications, with the features joined point in
time exactly as the training set was, on a Ray Data actor pool.

    result = platform.batch.score("underwriting_pd", "s3://lake/applications/2025-01/", reasons=True)
    result.rows, result.rows_per_s, result.dataset       # scores/underwriting_pd/<UTC stamp>, v1

A run, step by step:

1. The model version is resolved (``version`` if given, else ``alias``) and the feature
   references it was trained on are read from its lineage: the training-set snapshot's
   ``features``, else its ``feature_service``. The booster's ``feature_name()`` picks and
   orders them.
2. ``platform.features.get_historical_features(applications, refs, entity_timestamp=...)``
   joins each application to the feature values usable at its own timestamp: the join the
   training set was built with, so a model scores the inputs it would have seen live.
3. ``map_batches`` runs ``ModelScorer`` (``mlplatform.batch.scorer``) on a fixed-size pool of
   actors, one CPU each: each loads the version once, then only scores.
4. The rows are written as Parquet, either as the next version of the dataset
   ``scores/<model>/<name>`` under the storage root (atomic: readers never see a partial
   run) or under ``output``.

Output columns: every column of the joined rows (the applications' own columns and the model's
features, so a score can be reproduced from its row), then ``probability_of_default``
(float64), ``reason_codes`` (list of strings, with ``reasons=True``), ``model_name`` and
``model_version``. Row order is not the input order.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from mlplatform.batch.scorer import MODEL_NAME, MODEL_VERSION, REASONS, SCORE, ModelScorer, check_free_columns, LoadLog
from mlplatform.errors import DataError, ModelError

if TYPE_CHECKING:
    import ray.data

    from mlplatform.features.definitions import FeatureService
    from mlplatform.models.registry import LoadedModel, ModelVersion
    from mlplatform.features.store import FeatureStore
    from mlplatform.models.registry import ModelRegistry
    from mlplatform.storage import DatasetStore, Storage
    from mlplatform.storage.datasets import DatasetVersion

__all__ = ["SCORE", "REASONS", "MODEL_NAME", "MODEL_VERSION", "BatchScoreResult", "BatchScoring", "ModelScorer"]

PREFIX = "scores"
DEFAULT_BATCH_SIZE = 32_768


@dataclass(frozen=True)
class BatchScoreResult:
    """What a batch-scoring run did and where its rows are.

    ``seconds`` is the whole run (feature join, scoring, writing); ``timings`` splits it into
    ``features`` (the point-in-time join, which runs eagerly) and ``score_and_write``.
    ``model_loads`` maps each scoring actor to how many times it loaded the model: one each,
    unless Ray restarted an actor.
    """

    model: str
    version: int
    rows: int
    seconds: float
    path: str
    dataset: DatasetVersion | None = None
    timings: dict[str, float] = field(default_factory=dict)
    model_loads: dict[str, int] = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")


@dataclass(frozen=True)
class _Plan:
    """A model version resolved for scoring: what the actors load and what the join fetches."""

    name: str
    version: int
    sha256: str
    feature_names: tuple[str, ...]
    refs: tuple[str, ...]
    full_feature_names: bool
    texts: dict[str, str]


class BatchScoring:
    """Batch scoring on Ray Data (``platform.batch``)."""

    def __init__(
        self,
        *,
        storage: Storage,
        datasets: DatasetStore,
        features: FeatureStore,
        models: ModelRegistry,
        connect_ray: Callable[[], Any],
    ) -> None:
        self.storage = storage
        self.datasets = datasets
        self.features = features
        self.models = models
        self.connect_ray = connect_ray

    def __repr__(self) -> str:
        return f"BatchScoring({self.storage.uri(PREFIX)!r})"

    def score(
        self,
        model: str | LoadedModel,
        applications: Any,
        *,
        version: int | None = None,
        alias: str | None = "production",
        entity_timestamp: str = "application_ts",
        features: FeatureService | str | Iterable[str] | None = None,
        output: str | os.PathLike[str] | None = None,
        name: str | None = None,
        reasons: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
        num_actors: int | None = None,
    ) -> BatchScoreResult:
        """Score every application with a registered model; write the scores as Parquet.

            result = platform.batch.score("underwriting_pd", applications_df, reasons=True)
            result.dataset.name        # 'scores/underwriting_pd/20250101T120000123456Z'
            platform.datasets.read(result.dataset.name).to_pandas()

        Args:
            model: a registered model's name, or a ``LoadedModel`` (its name and version are
                used; the actors load that version from this platform's registry).
            applications: the rows to score, anything ``get_historical_features`` takes: a
                pandas DataFrame, a pyarrow Table, a ``ray.data.Dataset`` or a Parquet path.
                They need the join keys of the model's views, ``entity_timestamp`` and the
                request fields of its on-demand views (e.g. ``amount``, ``term``).
            version: the version to use. When given, ``alias`` is ignored.
            alias: the alias whose version to use when ``version`` is None; None = the latest.
            entity_timestamp: the column holding each application's point in time. A feature
                value is used only if it was observable at that time (see
                ``get_historical_features``): score historical applications as of when they
                were made, or new ones as of now.
            features: the feature references to join, for a model whose lineage records none
                (default: from the lineage, see the module docstring).
            output: a new or empty directory (local, or ``s3://`` with the storage root's S3
                settings) to write Parquet files to, instead of a versioned dataset under the
                storage root. Not atomic: a failed run can leave some files there.
            name: the run's name: the dataset is ``scores/<model>/<name>`` (default: the UTC
                start time). Scoring again under the same name publishes its next version.
            reasons: add ``reason_codes``, the reason texts for each row (``ReasonCoder``:
                features pushing toward default, largest first, at most four). Costs a
                contribution pass and Python per row: several times slower than scoring alone.
            batch_size: rows per ``Booster.predict`` call inside an actor.
            num_actors: scoring actors (one CPU each); default: the cluster's CPUs. A pool
                larger than the cluster waits for the autoscaler to add CPUs.

        Returns:
            A ``BatchScoreResult``: rows, seconds, rows/s, the ``DatasetVersion`` or path.

        Raises:
            NotFoundError: the model, version or alias does not exist (from the registry).
            IntegrityError: the model's bytes do not match their recorded sha256.
            ModelError: not a LightGBM model, or its features are not all among the refs.
            DataError: the applications lack a needed column (from the feature join), already
                have one of the output columns, or ``output`` is not a new or empty directory.
            DefinitionError: a feature reference names an unknown view or feature.
        """
        started = time.perf_counter()
        _check_sizes(batch_size, num_actors)
        plan = self._plan(model, version=version, alias=alias, features=features)
        ray = self.connect_ray()
        check_free_columns(_columns_of(applications, ray))
        target = _Output.of(self.storage, output) if output is not None else None
        joined = self.features.get_historical_features(
            applications, list(plan.refs), entity_timestamp=entity_timestamp, full_feature_names=plan.full_feature_names
        )
        joined_at = time.perf_counter()
        with LoadLog(ray) as log:
            # The join's output columns are known, so its (lazy) schema is not asked for: that
            # would run the on-demand features over a block just to learn it.
            scored = self._scored(
                joined, plan, reasons=reasons, batch_size=batch_size, num_actors=num_actors, log=log, check=False
            )
            if target is not None:
                dataset, rows, path = None, target.write(scored), target.uri
            else:
                run = name or f"{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}"
                dataset = self.datasets.publish(
                    f"{PREFIX}/{plan.name}/{run}",
                    scored,
                    metadata={
                        "model": plan.name,
                        "version": plan.version,
                        "sha256": plan.sha256,
                        "features": list(plan.refs),
                        "entity_timestamp": entity_timestamp,
                        "reasons": reasons,
                    },
                )
                path, rows = self.storage.uri(dataset.name), dataset.rows
            loads = log.loads()
        finished = time.perf_counter()
        return BatchScoreResult(
            model=plan.name,
            version=plan.version,
            rows=rows,
            seconds=finished - started,
            path=path,
            dataset=dataset,
            timings={"features": joined_at - started, "score_and_write": finished - joined_at},
            model_loads=loads,
        )

    def score_features(
        self,
        model: str | LoadedModel,
        features: ray.data.Dataset,
        *,
        version: int | None = None,
        alias: str | None = "production",
        reasons: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
        num_actors: int | None = None,
    ) -> ray.data.Dataset:
        """Score rows that already carry the model's feature columns: step 3 of ``score``
        alone, lazily (nothing runs until the dataset is consumed or written).

            scored = platform.batch.score_features("underwriting_pd", feature_rows, alias="candidate")
            scored.write_parquet("/tmp/scores")

        The feature columns must be named as the booster names them (``feature_name()``);
        other columns pass through. No point-in-time join happens here: the caller vouches
        that each row's features are the ones usable at its time.

        Raises:
            NotFoundError, IntegrityError, ModelError: as ``score`` (with ``reasons=True`` the
                lineage must name the features, for their reason texts).
            DataError: a model feature column is missing, or an output column already exists.
        """
        _check_sizes(batch_size, num_actors)
        # Reason texts come from the feature definitions the lineage names; scores need neither.
        plan = self._plan(model, version=version, alias=alias, features=None, need_refs=reasons)
        self.connect_ray()
        return self._scored(
            features, plan, reasons=reasons, batch_size=batch_size, num_actors=num_actors, log=None, check=True
        )

    # ---------------------------------------------------------------------- internals
    def _plan(
        self,
        model: str | LoadedModel,
        *,
        version: int | None,
        alias: str | None,
        features: FeatureService | str | Iterable[str] | None,
        need_refs: bool = True,
    ) -> _Plan:
        from mlplatform.models.registry import LoadedModel
        from mlplatform.models.reasons import reason_texts_from_definitions

        if isinstance(model, LoadedModel):
            loaded = model
        elif isinstance(model, str):
            loaded = self.models.load(model, version=version, alias=None if version is not None else alias)
        else:
            raise ModelError(f"model must be a registered model's name or a LoadedModel, got {type(model).__name__}")
        mv = loaded.version
        if mv.flavor != "lightgbm":
            raise ModelError(f"model {mv.name} v{mv.version} is a {mv.flavor!r} model; batch scoring runs LightGBM models")
        names = tuple(loaded.model.feature_name())
        if not need_refs:
            return _Plan(mv.name, mv.version, mv.artifacts[mv.model_file], names, (), False, {})
        candidates = self.features.resolve_features(features if features is not None else _lineage_refs(mv))
        refs, full = _match_refs(mv, names, candidates)
        texts = reason_texts_from_definitions(refs, self.features.registry, full_feature_names=full)
        return _Plan(mv.name, mv.version, mv.artifacts[mv.model_file], names, refs, full, texts)

    def _scored(
        self,
        rows: ray.data.Dataset,
        plan: _Plan,
        *,
        reasons: bool,
        batch_size: int,
        num_actors: int | None,
        log: LoadLog | None,
        check: bool,
    ) -> ray.data.Dataset:
        import ray

        if check:
            columns = set(rows.schema().names)
            missing = [n for n in plan.feature_names if n not in columns]
            if missing:
                raise DataError(
                    f"rows to score lack model {plan.name} v{plan.version}'s feature columns {missing}; "
                    f"they have {sorted(columns)}"
                )
            check_free_columns(columns)
        if num_actors is None:
            num_actors = max(1, int(ray.cluster_resources().get("CPU", 1)))
        return rows.map_batches(
            ModelScorer,
            fn_constructor_kwargs={
                "storage": self.storage,
                "name": plan.name,
                "version": plan.version,
                "sha256": plan.sha256,
                "feature_names": plan.feature_names,
                "texts": plan.texts if reasons else None,
                "num_threads": 1,
                "load_log": log.actor if log is not None else None,
            },
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_cpus=1,
        )


# -------------------------------------------------------------------------- helpers
def _lineage_refs(mv: ModelVersion) -> list[str] | str:
    """The feature references a version was trained on, from its lineage."""
    training_set = mv.lineage.get("training_set")
    if isinstance(training_set, Mapping) and training_set.get("features"):
        return list(training_set["features"])
    service = mv.lineage.get("feature_service")
    if isinstance(service, str) and service:
        return service
    raise ModelError(
        f"model {mv.name} v{mv.version} records no features in its lineage (training_set.features or "
        f"feature_service); pass features=[...] with the 'view:feature' refs it was trained on"
    )


def _match_refs(mv: ModelVersion, names: tuple[str, ...], refs: list[str]) -> tuple[tuple[str, ...], bool]:
    """The refs the booster reads, in its order, and whether it names them ``view__feature``."""
    short = {ref.split(":", 1)[1]: ref for ref in reversed(refs)}
    full = {ref.replace(":", "__", 1): ref for ref in refs}
    if all(n in short for n in names):
        return tuple(short[n] for n in names), False
    if all(n in full for n in names):
        return tuple(full[n] for n in names), True
    missing = [n for n in names if n not in short and n not in full]
    raise ModelError(
        f"model {mv.name} v{mv.version} reads features {missing} that its feature references do not provide "
        f"(refs: {refs}); pass features=[...] naming them"
    )


def _columns_of(applications: Any, ray: Any) -> list[str] | None:
    """The columns of the rows to score, where knowing them costs nothing (None for a path)."""
    import pandas as pd
    import pyarrow as pa

    if isinstance(applications, pd.DataFrame):
        return [str(c) for c in applications.columns]
    if isinstance(applications, pa.Table):
        return applications.column_names
    if isinstance(applications, ray.data.Dataset):
        return applications.schema().names  # the feature join asks for it too
    return None


def _check_sizes(batch_size: int, num_actors: int | None) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive number of rows, got {batch_size!r}")
    if num_actors is not None and (isinstance(num_actors, bool) or not isinstance(num_actors, int) or num_actors < 1):
        raise DataError(f"num_actors must be a positive integer or None (one per cluster CPU), got {num_actors!r}")


@dataclass(frozen=True)
class _Output:
    """An ``output=`` directory: where it is, and the filesystem that reaches it."""

    uri: str
    path: str
    fs: Any

    @classmethod
    def of(cls, storage: Storage, output: str | os.PathLike[str]) -> _Output:
        """Raises DataError unless ``output`` is a new or empty directory."""
        import pyarrow.fs as pafs

        uri = os.fspath(output)
        if uri.startswith("s3://"):
            if not storage.is_s3:
                raise DataError(f"output {uri!r} is on S3 but the storage root is local; configure storage.s3")
            out = cls(uri, uri.removeprefix("s3://"), storage.arrow_fs)
        else:
            uri = os.path.abspath(uri)
            out = cls(uri, uri, pafs.LocalFileSystem())
        info = out.fs.get_file_info(out.path)
        if info.type == pafs.FileType.File or (
            info.type == pafs.FileType.Directory and out.fs.get_file_info(pafs.FileSelector(out.path))
        ):
            raise DataError(f"output {uri!r} already exists and is not an empty directory; pick a new path")
        return out

    def write(self, ds: ray.data.Dataset) -> int:
        """Write ``ds`` as Parquet here; the rows written, read back from the files' footers."""
        import pyarrow.dataset as pds

        ds.write_parquet(self.path, filesystem=self.fs)
        if self.fs.get_file_info(self.path).type.name == "NotFound":  # no rows: no files
            return 0
        return pds.dataset(self.path, format="parquet", filesystem=self.fs).count_rows()
