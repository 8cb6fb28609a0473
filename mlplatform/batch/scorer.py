"""The scoring actor: ``ModelScorer``, the callable class each actor in a batch-scoring run's
Ray Data pool runs (step 3 of ``mlplatform.batch.score``), with the output columns it adds and
the log that counts its model loads.

    rows.map_batches(ModelScorer, fn_constructor_kwargs={...}, batch_format="pyarrow",
                     compute=ray.data.ActorPoolStrategy(size=num_actors), num_cpus=1)

Each actor loads the version from the registry once, in its constructor (every artifact's
sha256 verified), and then only scores: the model never travels with a batch. The input matrix
is encoded like the online path (``ReasonCoder.matrix``: ``feature_name()`` order, float64,
null → NaN) and scored with ``Booster.predict``, one thread per actor CPU. Everything here is
module level, so Ray ships it to the actors by import path.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from mlplatform.errors import DataError, ModelError

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from mlplatform.storage import Storage

__all__ = ["MODEL_NAME", "MODEL_VERSION", "REASONS", "SCORE", "LoadLog", "ModelScorer", "check_free_columns"]

SCORE = "probability_of_default"
REASONS = "reason_codes"
MODEL_NAME = "model_name"
MODEL_VERSION = "model_version"


class ModelScorer:
    """The callable class each scoring actor runs: loads one model version once, then scores
    batches (``pyarrow.Table`` in, the same rows plus the output columns out).

    Args:
        storage: the storage root, to open the model registry from the actor.
        name, version, sha256: the version to load and the model file's expected checksum.
        feature_names: the booster's feature names, as the driver read them.
        texts: feature → reason text; None = no reason codes.
        num_threads: LightGBM threads per ``predict`` (match the actor's CPUs).
        load_log: an actor that records each load (``LoadLog``), or None.
    """

    def __init__(
        self,
        *,
        storage: Storage,
        name: str,
        version: int,
        sha256: str,
        feature_names: Sequence[str],
        texts: Mapping[str, str] | None,
        num_threads: int,
        load_log: Any = None,
    ) -> None:
        _import_lightgbm_without_sklearn()
        from mlplatform.models.reasons import ReasonCoder
        from mlplatform.models.registry import ModelRegistry

        loaded = ModelRegistry(storage).load(name, version=version)
        mv = loaded.version
        if mv.artifacts[mv.model_file] != sha256:
            raise ModelError(
                f"model {name} v{version} in the registry has sha256 {mv.artifacts[mv.model_file]}, "
                f"not the {sha256} the run was planned with; the registry changed under it"
            )
        self.booster = loaded.model
        if tuple(self.booster.feature_name()) != tuple(feature_names):
            raise ModelError(f"model {name} v{version} has features {self.booster.feature_name()}, not {list(feature_names)}")
        self.names = list(feature_names)
        self.name = name
        self.version = version
        self.num_threads = num_threads
        # The coder holds what the model says about encoding (categories); it is built for
        # scoring too, so that batch and online inputs are encoded by the same rules.
        self.coder = ReasonCoder(self.booster, texts or {})
        self.with_reasons = texts is not None
        # LightGBM keeps the category lists of features trained as pandas categoricals here.
        self._numeric = not getattr(self.booster, "pandas_categorical", None)
        if load_log is not None:
            import ray

            ray.get(load_log.record.remote(ray.get_runtime_context().get_actor_id()))

    def __call__(self, batch: pa.Table) -> pa.Table:
        import numpy as np
        import pyarrow as pa

        check_free_columns(batch.column_names)  # rows from a Parquet path were not checked before
        x = self.matrix(batch)
        n = batch.num_rows
        out = batch.append_column(SCORE, pa.array(self.booster.predict(x, num_threads=self.num_threads), pa.float64()))
        if self.with_reasons:
            explained = self.coder.explain(batch.select(self.names).to_pandas())
            out = out.append_column(REASONS, pa.array([[r.text for r in rs] for rs in explained], pa.list_(pa.string())))
        name = pa.DictionaryArray.from_arrays(np.zeros(n, np.int32), [self.name]).cast(pa.string())
        out = out.append_column(MODEL_NAME, name)
        return out.append_column(MODEL_VERSION, pa.array(np.full(n, self.version, np.int64)))

    def matrix(self, batch: pa.Table) -> np.ndarray:
        """The model input: ``ReasonCoder.matrix``'s encoding, built straight from Arrow when
        every feature is a number (the same float64 values, without a pandas round trip)."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        columns = [batch.column(name) for name in self.names]
        if not self._numeric or not all(_is_number(c.type) for c in columns):
            return self.coder.matrix(batch.select(self.names).to_pandas())
        x = np.empty((batch.num_rows, len(columns)))
        for j, column in enumerate(columns):
            # safe=False: an int64 beyond 2**53 rounds, as pandas' to_numpy(float) rounds it
            x[:, j] = pc.cast(column, pa.float64(), safe=False).to_numpy()
        return x


# -------------------------------------------------------------------------- helpers
def _import_lightgbm_without_sklearn() -> None:
    """Import LightGBM with scikit-learn hidden, then unhide it.

    ``import lightgbm`` imports scikit-learn (and SciPy) for its sklearn-style estimators,
    which a scoring actor never uses; on a fresh actor that is most of its start, ~3 s of CPU
    out of ~5. Hiding it makes LightGBM define stand-ins for those estimators in this process
    only (a scoring actor's own), and ``import sklearn`` works again afterwards.
    """
    import sys

    if "lightgbm" in sys.modules or "sklearn" in sys.modules:
        return
    sys.modules["sklearn"] = None  # type: ignore[assignment]  # makes `import sklearn` raise ImportError
    try:
        import lightgbm  # noqa: F401
    except ImportError:
        pass  # not installed: loading the model raises DependencyError with the pip line
    finally:
        if sys.modules.get("sklearn", 0) is None:
            del sys.modules["sklearn"]


def check_free_columns(columns: Iterable[str] | None) -> None:
    """Refuse rows that already carry one of the output columns scoring adds (a DataError)."""
    taken = [c for c in (SCORE, REASONS, MODEL_NAME, MODEL_VERSION) if c in set(columns or ())]
    if taken:
        raise DataError(f"the rows to score already have output column(s) {taken}; drop or rename them first")


def _is_number(t: pa.DataType) -> bool:
    import pyarrow.types as pat

    return pat.is_integer(t) or pat.is_floating(t) or pat.is_boolean(t) or pat.is_null(t)


class LoadLog:
    """A small actor that scoring actors report their model loads to, so a run can say how
    often the model was loaded (once per actor; more only if Ray restarted one)."""

    def __init__(self, ray: Any) -> None:
        self._ray = ray
        self.actor: Any = None

    def __enter__(self) -> LoadLog:
        self.actor = _remote_load_counter().remote()
        return self

    def loads(self) -> dict[str, int]:
        return dict(self._ray.get(self.actor.loads.remote()))

    def __exit__(self, *exc: object) -> None:
        self._ray.kill(self.actor)


class _LoadCounter:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def record(self, who: str) -> None:
        self.counts[who] = self.counts.get(who, 0) + 1

    def loads(self) -> dict[str, int]:
        return self.counts


@functools.cache
def _remote_load_counter() -> Any:
    import ray

    return ray.remote(num_cpus=0)(_LoadCounter)
