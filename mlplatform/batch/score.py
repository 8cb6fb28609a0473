"""Batch scoring: a registered model of any flavor over many rows, on a Ray Data actor pool.

    result = platform.batch.score("underwriting_pd", "s3://lake/applications/2025-01/", reasons=True)
    result.rows, result.rows_per_s, result.dataset       # scores/underwriting_pd/<UTC stamp>, v1
    scored = platform.batch.score_features("fraud", sequences)     # rows that carry the inputs

``score`` joins each application to its features point in time, exactly as the training set
was joined; ``score_features`` scores rows that already carry the model's inputs (a
transformer's sequences, say) and is lazy. A run of ``score``, step by step:

1. The model version is resolved (``version`` if given, else ``alias``) and loaded as a
   predictor (``ModelRegistry.load_predictor``: the interface online serving and replay
   use). Its signature's inputs name the features to join; the feature references it was
   trained on are read from its lineage: the training-set snapshot's ``features``, else its
   ``feature_service``.
2. ``platform.features.get_historical_features(applications, refs, entity_timestamp=...)``
   joins each application to the feature values usable at its own timestamp: the join the
   training set was built with, so a model scores the inputs it would have seen live.
3. ``map_batches`` runs ``ModelScorer`` (``mlplatform.batch.scorer``) on a fixed-size pool of
   actors, one CPU each: each loads the version once, then only scores, each batch through
   ``predictor.predict`` (its columns made into the inputs by ``scorer.arrow_inputs``).
4. The rows are written as Parquet, either as the next version of the dataset
   ``scores/<model>/<name>`` under the storage root (atomic: readers never see a partial
   run) or under ``output``.

Output columns: every column of the rows (the applications' own columns and the model's
features, so a score can be reproduced from its row), then one column per model output
(``scorer.output_columns``: a ``probability`` output — what both flavors call a binary
model's — as ``probability_of_default``, float64; any other under its own name, an output
of shape ``[-1, K]`` as a fixed-size list), ``reason_codes`` (list of strings, with
``reasons=True``, LightGBM models only), ``model_name`` and ``model_version``. Row order is
not the input order.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from mlplatform.batch.scorer import (
    MODEL_NAME,
    MODEL_VERSION,
    REASONS,
    SCORE,
    LoadLog,
    ModelScorer,
    check_free_columns,
    output_columns,
    reason_coder,
)
from mlplatform.errors import DataError, ModelError

if TYPE_CHECKING:
    import ray.data

    from mlplatform.features.definitions import FeatureService
    from mlplatform.features.store import FeatureStore
    from mlplatform.models.flavors import Predictor, Signature
    from mlplatform.models.registry import LoadedModel, ModelRegistry, ModelVersion
    from mlplatform.storage import DatasetStore, Storage
    from mlplatform.storage.datasets import DatasetVersion

__all__ = ["MODEL_NAME", "MODEL_VERSION", "REASONS", "SCORE", "BatchScoreResult", "BatchScoring", "ModelScorer"]

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
    """A model version resolved for scoring: what the actors load, what the join fetches and
    which columns the scores go to."""

    name: str
    version: int
    flavor: str
    sha256: str
    signature: Signature
    refs: tuple[str, ...] = ()
    full_feature_names: bool = False
    texts: dict[str, str] = field(default_factory=dict)

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.signature.inputs)

    @property
    def outputs(self) -> tuple[str, ...]:
        return output_columns(self.signature)


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

        The model's inputs are feature values: each input of its signature is a feature of
        shape ``[-1]``, named as the feature (``view__feature`` or the feature's own name),
        as LightGBM models' are. A model whose inputs are built otherwise (a transformer's
        sequences) is scored with ``score_features``.

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
                features pushing toward default, largest first, at most four). LightGBM models
                only. Costs a contribution pass and Python per row: several times slower than
                scoring alone.
            batch_size: rows per ``predict`` call inside an actor (and per Ray Data batch). A
                neural model holds activations for that many rows at once: pick what fits.
            num_actors: scoring actors (one CPU each); default: the cluster's CPUs. A pool
                larger than the cluster waits for the autoscaler to add CPUs.

        Returns:
            A ``BatchScoreResult``: rows, seconds, rows/s, the ``DatasetVersion`` or path.

        Raises:
            NotFoundError: the model, version or alias does not exist (from the registry).
            IntegrityError: the model's bytes do not match their recorded sha256.
            ModelError: no predictor can be built from the version; an input of the model is
                not a feature (a shape other than ``[-1]``) or not among the feature refs; or
                ``reasons=True`` for a model that is not LightGBM.
            DataError: the applications lack a needed column (from the feature join), already
                have one of the output columns, or ``output`` is not a new or empty directory.
            DefinitionError: a feature reference names an unknown view or feature.
        """
        started = time.perf_counter()
        _check_sizes(batch_size, num_actors)
        plan = self._plan(model, version=version, alias=alias, features=features, reasons=reasons, join=True)
        ray = self.connect_ray()
        check_free_columns(_columns_of(applications, ray), plan.outputs)
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
                dataset = self._publish(scored, plan, name=name, entity_timestamp=entity_timestamp, reasons=reasons)
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
        rows: ray.data.Dataset,
        *,
        version: int | None = None,
        alias: str | None = "production",
        reasons: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
        num_actors: int | None = None,
    ) -> ray.data.Dataset:
        """Score rows that already carry the model's inputs as columns: step 3 of ``score``
        alone, for a model of any flavor, lazily (nothing runs until the dataset is consumed
        or written).

            scored = platform.batch.score_features("underwriting_pd", feature_rows, alias="candidate")
            scored.write_parquet("/tmp/scores")

            # a transformer over sequences: one column per input of its signature
            sequences = platform.datasets.read("training_sets/fraud_sequences")
            scored = platform.batch.score_features("fraud", sequences, batch_size=512)

        Each input of the model's signature (``platform.models.load_predictor(...)[1].signature``;
        for LightGBM the booster's ``feature_name()``) is read from the column of its name,
        as ``mlplatform.batch.scorer.arrow_inputs`` states exactly: an input of shape
        ``[-1]`` from a column of values, one of shape ``[-1, K]`` from a list or fixed-size
        list column whose lists all have one length, as a ``[B, K]`` array; numbers are cast
        to the input's datatype (a null is NaN for a float input, refused for an integer or
        bool one). Other columns pass through; the output columns are ``score``'s. No
        point-in-time join happens here: the caller vouches that each row's inputs are the
        ones usable at its time.

        A neural model's scores depend in their last bits on how many rows are scored
        together (its kernels take other paths for other batch shapes), so scoring the same
        rows in other batches agrees to float precision, not bit for bit; LightGBM's scores
        do not depend on it.

        Args:
            rows: a ``ray.data.Dataset`` holding the model's input columns.
            model, version, alias, reasons, batch_size, num_actors: as ``score`` (with
                ``reasons=True`` the lineage must name the features, for their reason texts).

        Raises:
            NotFoundError, IntegrityError, ModelError: as ``score``.
            DataError: an input column is missing or an output column already exists; when the
                rows are scored, a column that does not fit its input (see ``arrow_inputs``).
        """
        _check_sizes(batch_size, num_actors)
        plan = self._plan(model, version=version, alias=alias, features=None, reasons=reasons, join=False)
        self.connect_ray()
        return self._scored(rows, plan, reasons=reasons, batch_size=batch_size, num_actors=num_actors, log=None, check=True)

    # ---------------------------------------------------------------------- internals
    def _plan(
        self,
        model: str | LoadedModel,
        *,
        version: int | None,
        alias: str | None,
        features: FeatureService | str | Iterable[str] | None,
        reasons: bool,
        join: bool,
    ) -> _Plan:
        """The version to score with, and with ``join`` or ``reasons`` the feature refs its
        inputs are (reason texts come from their definitions; scores need neither)."""
        from mlplatform.models.reasons import reason_texts_from_definitions

        mv, predictor = self._load(model, version=version, alias=alias)
        plan = _Plan(mv.name, mv.version, mv.flavor, mv.artifacts[mv.model_file], predictor.signature)
        what = f"model {mv.name} v{mv.version}"
        if reasons:
            reason_coder(predictor, {}, what)  # refuses a model that is not LightGBM before any work
        if join:
            not_features = [f"{s.name} {list(s.shape)}" for s in plan.signature.inputs if len(s.shape) != 1]
            if not_features:
                raise ModelError(
                    f"{what} ({mv.flavor}) takes inputs that are not feature values: {not_features}; "
                    "batch.score joins one value per feature and row, so build these inputs as columns "
                    "and score them with platform.batch.score_features"
                )
        elif not reasons:
            return plan
        candidates = self.features.resolve_features(features if features is not None else _lineage_refs(mv))
        refs, full = _match_refs(mv, plan.inputs, candidates)
        texts = reason_texts_from_definitions(refs, self.features.registry, full_feature_names=full) if reasons else {}
        return dataclasses.replace(plan, refs=refs, full_feature_names=full, texts=texts)

    def _load(self, model: str | LoadedModel, *, version: int | None, alias: str | None) -> tuple[ModelVersion, Predictor]:
        """The version and its predictor, loaded here for its signature (the actors load their own)."""
        from mlplatform.models.registry import LoadedModel

        if isinstance(model, LoadedModel):
            return self.models.load_predictor(model.version.name, version=model.version.version)
        if isinstance(model, str):
            return self.models.load_predictor(model, version=version, alias=None if version is not None else alias)
        raise ModelError(f"model must be a registered model's name or a LoadedModel, got {type(model).__name__}")

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
            missing = [n for n in plan.inputs if n not in columns]
            if missing:
                raise DataError(
                    f"rows to score lack model {plan.name} v{plan.version}'s input columns {missing}; "
                    f"they have {sorted(columns)}"
                )
            check_free_columns(columns, plan.outputs)
        if num_actors is None:
            num_actors = max(1, int(ray.cluster_resources().get("CPU", 1)))
        return rows.map_batches(
            ModelScorer,
            fn_constructor_kwargs={
                "storage": self.storage,
                "name": plan.name,
                "version": plan.version,
                "sha256": plan.sha256,
                "signature": plan.signature,
                "texts": plan.texts if reasons else None,
                "num_threads": 1,
                "load_log": log.actor if log is not None else None,
            },
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_cpus=1,
        )

    def _publish(
        self, scored: ray.data.Dataset, plan: _Plan, *, name: str | None, entity_timestamp: str, reasons: bool
    ) -> DatasetVersion:
        """The scored rows as the next version of ``scores/<model>/<name>`` (runs the scoring)."""
        run = name or f"{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}"
        return self.datasets.publish(
            f"{PREFIX}/{plan.name}/{run}",
            scored,
            metadata={
                "model": plan.name,
                "version": plan.version,
                "flavor": plan.flavor,
                "sha256": plan.sha256,
                "features": list(plan.refs),
                "entity_timestamp": entity_timestamp,
                "reasons": reasons,
            },
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
    """The refs the model reads as its inputs, in their order, and whether it names them ``view__feature``."""
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
