"""The ``lightgbm`` flavor: LightGBM's own text model (``model.txt``), one input tensor per feature.

    flavor = LightGBMFlavor()
    saved = flavor.save(booster)                       # {"model.txt": b"tree\\n..."}, config {}
    predictor = flavor.load(saved.files, saved.config)
    [spec.name for spec in predictor.signature.inputs] == booster.feature_name()
    p = predictor.predict({"loans_90d": np.array([2.0, None]), "category": np.array(["travel", "food"], object)})
    p["probability"]                                   # == booster.predict(encode_frame(booster, frame))

The signature has one input per model feature, named as the feature and in
``booster.feature_name()`` order, each of shape ``[-1]`` (a batch of values): ``FP64``, or
``BYTES`` for a feature trained as a pandas categorical with string categories. There is one
output: ``probability`` (``FP64``, ``[-1]``) for a binary or cross-entropy objective, else
``prediction`` (the booster's ``predict``, e.g. a regression value).

Inputs are encoded by :mod:`mlplatform.models.encoding` — the one rule the decision service,
replay, reason codes and batch scoring share: None/NaN (and pandas' NA) are missing, a
category is its position in the model's category list and an unseen one is missing — so a
predictor's score equals theirs bit for bit. ``BYTES`` values may be ``str`` or UTF-8
``bytes`` (as the Open Inference Protocol carries them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mlplatform.errors import DataError, DependencyError, ModelError
from mlplatform.models.flavors.base import SavedModel, Signature, TensorSpec, check_input_names

if TYPE_CHECKING:
    import lightgbm

__all__ = ["LightGBMFlavor", "LightGBMPredictor", "model_text", "read_booster"]

_PROBABILITY_OBJECTIVES = ("binary", "cross_entropy", "xentropy")


class LightGBMFlavor:
    """Stores a LightGBM model as its text model and loads it as a :class:`LightGBMPredictor`."""

    name: ClassVar[str] = "lightgbm"
    model_file: ClassVar[str] = "model.txt"

    def save(self, model: Any, config: Mapping[str, Any] | None = None) -> SavedModel:
        """``model`` as LightGBM's text model: a ``lightgbm.Booster``, a fitted ``LGBMModel``
        (its ``booster_``) or text already produced by ``Booster.model_to_string()``. The
        booster's best iteration is kept when early stopping found one, else every iteration.

        Raises:
            ModelError: ``model`` is none of those, or ``config`` is not empty (this flavor
                has nothing to configure: everything is in the text model).
        """
        if config:
            raise ModelError(f"flavor 'lightgbm' takes no flavor_config (the text model holds everything), got {dict(config)!r}")
        return SavedModel(files={self.model_file: model_text(model).encode()}, config={})

    def load(
        self, files: Mapping[str, bytes], config: Mapping[str, Any], *, device: str = "cpu", precision: str = "fp32"
    ) -> LightGBMPredictor:
        """A predictor from the text model in ``files["model.txt"]``. LightGBM runs on the CPU:
        ``device`` must be ``"cpu"``; ``precision`` is ignored (trees compare doubles).

        Raises:
            ModelError: the file is missing or does not parse, the device is not the CPU, or
                the model has more than one output per iteration (multiclass).
            DependencyError: lightgbm is not installed.
        """
        if device != "cpu":
            raise ModelError(f"flavor 'lightgbm' predicts on the CPU only, got device {device!r}")
        if self.model_file not in files:
            raise ModelError(f"flavor 'lightgbm' needs the file {self.model_file!r}; got {sorted(files)}")
        return LightGBMPredictor(read_booster(files[self.model_file]))

    def read(self, data: bytes) -> lightgbm.Booster:
        """The model file as a ``lightgbm.Booster`` (what ``ModelRegistry.load`` returns).

        Raises:
            ModelError: the bytes are not a LightGBM text model.
            DependencyError: lightgbm is not installed.
        """
        return read_booster(data)


class LightGBMPredictor:
    """A booster behind the flavor interface.

    Attributes:
        booster: the ``lightgbm.Booster`` (reason codes need it).
        signature: one ``[-1]`` input per feature, in ``booster.feature_name()`` order.
        num_threads: threads per ``predict`` call; 1 (the default) suits a serving replica
            answering small batches, more a large batch. Scores do not depend on it.
    """

    def __init__(self, booster: lightgbm.Booster, *, num_threads: int = 1) -> None:
        from mlplatform.models.encoding import model_info

        if booster.num_model_per_iteration() != 1:
            raise ModelError(
                f"flavor 'lightgbm' predicts single-output models (binary, regression); this one has "
                f"{booster.num_model_per_iteration()} outputs per iteration (multiclass)"
            )
        self.booster = booster
        self.num_threads = num_threads
        info = model_info(booster)  # the category lists, cached per booster for encode_frame
        inputs = []
        for j, name in enumerate(info.names):
            cats = info.categories.get(j)
            string = cats is not None and any(isinstance(c, str) for c in cats)
            inputs.append(TensorSpec(name, "BYTES" if string else "FP64", (-1,)))
        output = "probability" if _objective(booster).startswith(_PROBABILITY_OBJECTIVES) else "prediction"
        self.signature = Signature(inputs=tuple(inputs), outputs=(TensorSpec(output, "FP64", (-1,)),))

    def __repr__(self) -> str:
        return f"LightGBMPredictor({len(self.signature.inputs)} features, output {self.signature.outputs[0].name!r})"

    def predict(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The output for a batch of rows given as one 1-D array per feature.

            predictor.predict({"loans_90d": np.array([2.0, np.nan]), "category": np.array(["travel", None], object)})

        Raises:
            DataError: a feature is missing, an extra name is given, an array is not 1-D, the
                arrays differ in length, or a numeric feature holds something that is not a number.
        """
        import pandas as pd

        from mlplatform.models.encoding import encode_frame

        arrays = _checked(self.signature, inputs)
        columns: dict[str, Any] = {}
        for spec in self.signature.inputs:
            array = arrays[spec.name]
            if spec.datatype == "BYTES":
                array = np.array([v.decode() if isinstance(v, bytes) else v for v in array], dtype=object)
            elif array.dtype.kind not in "biuf":
                # The conversion encode_frame makes, done here to name the input that fails it.
                try:
                    array = pd.to_numeric(pd.Series(array, dtype=object), errors="raise").to_numpy(dtype=float, na_value=np.nan)
                except (TypeError, ValueError) as exc:
                    raise DataError(f"input {spec.name!r} is not numeric ({spec.datatype}): {exc}") from None
            columns[spec.name] = array
        frame = pd.DataFrame(columns, index=pd.RangeIndex(_batch(arrays)))
        x = encode_frame(self.booster, frame)
        out = np.asarray(self.booster.predict(x, num_threads=self.num_threads), dtype=np.float64)
        return {self.signature.outputs[0].name: out}


# ------------------------------------------------------------------------------ codec
def model_text(model: Any) -> str:
    """LightGBM's text model of a ``Booster``, a fitted ``LGBMModel`` or text already made.

    Raises:
        ModelError: ``model`` is none of those.
    """
    if isinstance(model, str):
        text = model
    else:
        booster = getattr(model, "booster_", model)  # the sklearn wrapper holds a Booster
        if not hasattr(booster, "model_to_string"):
            raise ModelError(
                f"flavor 'lightgbm' needs a lightgbm.Booster (or its model_to_string() text), got {type(model).__name__}"
            )
        # Default num_iteration: the best iteration when early stopping found one, else all.
        text = booster.model_to_string()
    if not text.startswith("tree\n"):
        raise ModelError("flavor 'lightgbm': the text does not look like a LightGBM model (it should start with 'tree')")
    return text


def read_booster(data: bytes) -> lightgbm.Booster:
    """A ``lightgbm.Booster`` parsed from its text model (plain data: nothing in it is run).

    Raises:
        ModelError: the bytes are not a LightGBM text model.
        DependencyError: lightgbm is not installed.
    """
    try:
        import lightgbm
    except ImportError:
        raise DependencyError.missing("lightgbm", "lightgbm>=4.3", "loading a LightGBM model") from None
    try:
        return lightgbm.Booster(model_str=data.decode())
    except (UnicodeDecodeError, lightgbm.basic.LightGBMError) as exc:
        raise ModelError(f"stored LightGBM model does not parse: {exc}") from None


# ---------------------------------------------------------------------------- helpers
def _objective(booster: lightgbm.Booster) -> str:
    """The objective as the text model's header states it (``binary sigmoid:1``, ``regression``…)."""
    for line in booster.model_to_string(num_iteration=1).splitlines():
        if line.startswith("objective="):
            return line.split("=", 1)[1]
        if line.startswith("Tree="):
            break
    return ""


def _checked(signature: Signature, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inputs as 1-D arrays of one length, every name known and none missing."""
    names = check_input_names(signature, inputs, " (pass None or NaN for a missing value)")
    arrays = {}
    for name in names:
        array = np.asarray(inputs[name])
        if array.ndim != 1:
            raise DataError(f"input {name!r} has shape {list(array.shape)}; expected [-1] (one value per row)")
        arrays[name] = array
    _batch(arrays)
    return arrays


def _batch(arrays: Mapping[str, np.ndarray]) -> int:
    sizes = {name: len(a) for name, a in arrays.items()}
    if len(set(sizes.values())) > 1:
        raise DataError(f"inputs differ in batch size: {sizes}")
    return next(iter(sizes.values()), 0)
