"""The scoring actor: ``ModelScorer``, the callable class each actor in a batch-scoring run's
Ray Data pool runs (step 3 of ``mlplatform.batch.score``), with the output columns it adds,
how an Arrow batch becomes a model's input tensors, and the log that counts its model loads.

    rows.map_batches(ModelScorer, fn_constructor_kwargs={...}, batch_format="pyarrow",
                     compute=ray.data.ActorPoolStrategy(size=num_actors), num_cpus=1)

Each actor loads the version once, in its constructor, through
``ModelRegistry.load_predictor`` (every artifact's sha256 verified), and then only scores:
the model never travels with a batch. A batch becomes the predictor's inputs by
:func:`arrow_inputs` and is scored by ``predictor.predict``, the call online serving and
replay make, so any flavor scores here as it does there (LightGBM's with
``mlplatform.models.encoding``, the online path's encoding). Everything here is module
level, so Ray ships it to the actors by import path.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from mlplatform.errors import DataError, ModelError

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from mlplatform.models.flavors import Signature, TensorSpec
    from mlplatform.storage import Storage

__all__ = [
    "MODEL_NAME",
    "MODEL_VERSION",
    "REASONS",
    "SCORE",
    "LoadLog",
    "ModelScorer",
    "arrow_inputs",
    "check_free_columns",
    "output_columns",
]

SCORE = "probability_of_default"
REASONS = "reason_codes"
MODEL_NAME = "model_name"
MODEL_VERSION = "model_version"
#: The output name both flavors give a probability; batch scoring writes it as ``SCORE``.
PROBABILITY = "probability"


class ModelScorer:
    """The callable class each scoring actor runs: loads one model version once, then scores
    batches (``pyarrow.Table`` in, the same rows plus the output columns out).

    Args:
        storage: the storage root, to open the model registry from the actor.
        name, version, sha256: the version to load and the model file's expected checksum.
        signature: the predictor's signature, as the driver read it (a check that the actor
            loads the model the run was planned with).
        texts: feature → reason text; None = no reason codes (LightGBM models only).
        num_threads: threads per ``predict`` for a predictor that has a ``num_threads``
            setting (LightGBM); match the actor's CPUs. Torch follows ``OMP_NUM_THREADS``,
            which Ray sets to the actor's CPUs.
        load_log: an actor that records each load (``LoadLog``), or None.

    Raises:
        ModelError: the version's model file or signature is not the planned one, or reason
            codes are asked of a model that is not LightGBM.
        IntegrityError, NotFoundError: from ``load_predictor``.
    """

    def __init__(
        self,
        *,
        storage: Storage,
        name: str,
        version: int,
        sha256: str,
        signature: Signature,
        texts: Mapping[str, str] | None,
        num_threads: int,
        load_log: Any = None,
    ) -> None:
        from mlplatform.models.registry import ModelRegistry

        registry = ModelRegistry(storage)
        if registry.get(name, version=version).flavor == "lightgbm":
            _import_lightgbm_without_sklearn()
        mv, predictor = registry.load_predictor(name, version=version)
        if mv.artifacts[mv.model_file] != sha256:
            raise ModelError(
                f"model {name} v{version} in the registry has sha256 {mv.artifacts[mv.model_file]}, "
                f"not the {sha256} the run was planned with; the registry changed under it"
            )
        if predictor.signature != signature:
            raise ModelError(f"model {name} v{version} has signature {predictor.signature}, not {signature}")
        if hasattr(predictor, "num_threads"):
            predictor.num_threads = num_threads
        self.predictor = predictor
        self.signature = signature
        self.outputs = output_columns(signature)
        self.name = name
        self.version = version
        self.coder = None if texts is None else reason_coder(predictor, texts, f"model {name} v{version}")
        if load_log is not None:
            import ray

            ray.get(load_log.record.remote(ray.get_runtime_context().get_actor_id()))

    def __call__(self, batch: pa.Table) -> pa.Table:
        import numpy as np
        import pyarrow as pa

        check_free_columns(batch.column_names, self.outputs)  # rows from a Parquet path were not checked before
        predicted = self.predictor.predict(arrow_inputs(batch, self.signature))
        out = batch
        for spec, column in zip(self.signature.outputs, self.outputs, strict=True):
            out = out.append_column(column, _arrow_column(predicted[spec.name]))
        if self.coder is not None:
            names = [spec.name for spec in self.signature.inputs]
            explained = self.coder.explain(batch.select(names).to_pandas())
            out = out.append_column(REASONS, pa.array([[r.text for r in rs] for rs in explained], pa.list_(pa.string())))
        n = batch.num_rows
        name = pa.DictionaryArray.from_arrays(np.zeros(n, np.int32), [self.name]).cast(pa.string())
        out = out.append_column(MODEL_NAME, name)
        return out.append_column(MODEL_VERSION, pa.array(np.full(n, self.version, np.int64)))


def reason_coder(predictor: Any, texts: Mapping[str, str], what: str) -> Any:
    """A ``ReasonCoder`` over the predictor's booster: reason codes are SHAP contributions of
    a tree model, which only the LightGBM flavor has.

    Raises:
        ModelError: the predictor is not a LightGBM one.
    """
    from mlplatform.models.flavors.lightgbm import LightGBMPredictor
    from mlplatform.models.reasons import ReasonCoder

    if not isinstance(predictor, LightGBMPredictor):
        raise ModelError(
            f"{what} is not a LightGBM model ({type(predictor).__name__}): reason codes explain LightGBM models "
            "only; score it with reasons=False"
        )
    return ReasonCoder(predictor.booster, texts)


# ------------------------------------------------------------------------ inputs, outputs
def arrow_inputs(batch: pa.Table, signature: Signature) -> dict[str, np.ndarray]:
    """The predictor's inputs from an Arrow batch: each input from the column of its name.

        inputs = arrow_inputs(table, predictor.signature)    # {"event_type": int8 [B, K], ...}
        predictor.predict(inputs)

    How a column becomes an input of ``signature`` (the predictor then casts each array to its
    datatype within its kind, e.g. int8 → INT64, and checks fixed sizes):

    * Shape ``[-1]``: the column's values. Shape ``[-1, K]`` (and deeper): a ``list``,
      ``large_list`` or ``fixed_size_list`` column (nested once per extra axis) whose rows'
      lists all have one length, as a ``[B, K]`` array, or a fixed-shape tensor column
      (``pa.fixed_shape_tensor``, or Ray Data's for numpy columns) of that many axes; a null
      list or tensor is refused.
    * Float datatypes (``FP16``/``FP32``/``FP64``): number, bool and null columns are cast to
      float (``FP64``: float64; others float32) with a null as NaN, and an integer beyond
      2**53 rounded (as pandas' ``to_numpy(float)`` rounds it). LightGBM reads NaN as missing.
    * ``BYTES``: strings (dictionary-encoded columns decoded), a null as None.
    * Integer and ``BOOL`` datatypes: the values in the column's own type; a null is refused
      (such a tensor has no missing value).

    Raises:
        DataError: a column is missing, is not a list column where the input has more than
            one axis, has lists of different lengths or null lists, or has a null where the
            input's datatype has no missing value (the message names the column).
    """
    columns = set(batch.column_names)
    missing = [spec.name for spec in signature.inputs if spec.name not in columns]
    if missing:
        raise DataError(f"the rows lack the model's input columns {missing}; they have {sorted(columns)}")
    return {spec.name: _input(spec, batch.column(spec.name)) for spec in signature.inputs}


def _input(spec: TensorSpec, column: Any) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.types as pat

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    rows, sizes = len(array), []
    tensor_shape = getattr(array.type, "shape", None) if isinstance(array.type, pa.BaseExtensionType) else None
    if tensor_shape is not None and len(tensor_shape) == len(spec.shape) - 1:
        # A fixed-shape tensor column (Arrow's canonical extension, or Ray Data's for numpy
        # columns): each row's values flattened, in row-major order, into a list of prod(shape).
        permutation = getattr(array.type, "permutation", None)
        if permutation is not None and list(permutation) != sorted(permutation):
            raise DataError(f"column {spec.name!r} is a tensor column with permutation {permutation}; store it row-major")
        if array.null_count:
            raise DataError(f"column {spec.name!r} has {array.null_count} null tensors; give every row its values")
        return _values(spec, array.storage.flatten()).reshape((rows, *tensor_shape))
    for axis, want in enumerate(spec.shape[1:], start=1):
        if not (pat.is_list(array.type) or pat.is_large_list(array.type) or pat.is_fixed_size_list(array.type)):
            raise DataError(
                f"column {spec.name!r} is {array.type}, but the model's input {spec.name!r} has shape "
                f"{list(spec.shape)}: it needs a list column (nested {len(spec.shape) - 1} deep), one list per row"
            )
        if array.null_count:
            raise DataError(f"column {spec.name!r} has {array.null_count} null lists at axis {axis}; give every row its list")
        if len(array):
            bounds = pc.min_max(pc.list_value_length(array))
            low, high = bounds["min"].as_py(), bounds["max"].as_py()
        else:
            low = high = max(want, 0)
        if low != high:
            raise DataError(
                f"column {spec.name!r} has lists of {low} to {high} values at axis {axis}; "
                f"the model's input {spec.name!r} (shape {list(spec.shape)}) needs one length"
            )
        sizes.append(high)
        array = array.flatten()  # unlike .values, respects the array's offset (a sliced batch)
    return _values(spec, array).reshape((rows, *sizes))


def _values(spec: TensorSpec, array: pa.Array) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.types as pat

    if pat.is_dictionary(array.type):
        array = array.dictionary_decode()
    if spec.datatype in ("FP16", "FP32", "FP64"):
        if _is_number(array.type) or pat.is_decimal(array.type):
            # safe=False: an int64 beyond 2**53 rounds, as pandas' to_numpy(float) rounds it
            array = pc.cast(array, pa.float64() if spec.datatype == "FP64" else pa.float32(), safe=False)
        return array.to_numpy(zero_copy_only=False)  # a null float is NaN; anything else the predictor refuses
    if spec.datatype != "BYTES" and array.null_count:
        raise DataError(
            f"column {spec.name!r} has {array.null_count} null values, but the model's input {spec.name!r} is "
            f"{spec.datatype}, which has no missing value; fill them or drop those rows"
        )
    return array.to_numpy(zero_copy_only=False)


def output_columns(signature: Signature) -> tuple[str, ...]:
    """The column each of the model's outputs is written to, in the signature's order: a
    ``probability`` output as ``probability_of_default`` (``SCORE``), any other under its own name.

        output_columns(lightgbm_pd.signature)     # ('probability_of_default',)
    """
    return tuple(SCORE if spec.name == PROBABILITY else spec.name for spec in signature.outputs)


def _arrow_column(values: np.ndarray) -> pa.Array:
    """An output array as a column: ``[B]`` as values, ``[B, K, …]`` as nested fixed-size lists."""
    import pyarrow as pa

    array = pa.array(values.reshape(-1))
    for size in reversed(values.shape[1:]):
        array = pa.FixedSizeListArray.from_arrays(array, size)
    return array


def check_free_columns(columns: Iterable[str] | None, outputs: Iterable[str] = (SCORE,)) -> None:
    """Refuse rows that already carry one of the output columns scoring adds (a DataError):
    the model's ``outputs`` (``output_columns``), ``reason_codes``, ``model_name``, ``model_version``."""
    present = set(columns or ())
    taken = [c for c in (*outputs, REASONS, MODEL_NAME, MODEL_VERSION) if c in present]
    if taken:
        raise DataError(f"the rows to score already have output column(s) {taken}; drop or rename them first")


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
