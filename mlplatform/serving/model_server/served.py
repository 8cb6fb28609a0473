"""Served models: each configured model follows its alias, holds a loaded predictor, batches
its calls, and can build its own input from the online store.

    server = ModelServer.local(configs, models=platform.models, catalog=catalog, serving_deadline_s=0.05)
    version, outputs = await server.infer("fraud", {"event_type": ..., ...})   # named arrays in/out
    doc = await server.predict("underwriting", {"applicant_id": [42], "merchant_id": [7], ...})

A model without a ``deployment`` is loaded in the ingress replica's process (no hop); one with
a ``deployment`` lives in a Serve deployment of its own (``model_server.deployment``) and the
ingress calls it through a handle. Either way a call goes through a ``ModelBatcher``:
requests that arrive while a batch runs are scored together (up to
``batching.max_batch_size``, waiting at most ``batching.max_wait`` for company), and each gets
its own rows back, with the version that scored them.

Feature-aware predict (``/v1/models/{name}/predict``) turns entity keys and request fields
into the model's input in one of two ways:

- the version's **feature service** (LightGBM models): the service's features are looked up
  online with the same ``get_online_features`` as the feature server and decisions; each
  becomes the model input of its name (the lightgbm flavor takes one tensor per feature);
- an **input builder** (``input_builder`` in the config, else the version's
  ``flavor_config["input_builder"]``): ``builder(catalog, rows, signature)`` returns the input
  arrays, e.g. the fraud model's behaviour sequence from the online event state, built by the
  same code as its training sequences.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
from ray import serve

from mlplatform.errors import DataError, ModelError, NotFoundError
from mlplatform.models.flavors.base import DATATYPES, Predictor, Signature, predict_in_fixed_batches
from mlplatform.serving.model_server.oip import conform
from mlplatform.serving.scoring import ModelWatcher

if TYPE_CHECKING:
    from mlplatform.models.registry import ModelRegistry
    from mlplatform.served_models import ServedModelConfig
    from mlplatform.serving.catalog import FeatureCatalog

__all__ = [
    "DECISION_ROWS",
    "InputBuilder",
    "ModelBatcher",
    "ModelScores",
    "ModelServer",
    "RemoteModel",
    "ServedModel",
    "ServedVersion",
    "device_and_precision",
    "load_builder",
]

log = logging.getLogger(__name__)

#: Rows per call when a decision scores a rule model: one shape for every call, so replay
#: recomputes each score bit for bit (see ``predict_in_fixed_batches``).
DECISION_ROWS = 8
#: ``builder(catalog, rows, signature) -> {input name: array}``: a model's input from the online store.
InputBuilder = Callable[["FeatureCatalog", Sequence[Mapping[str, Any]], Signature], Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class ServedVersion:
    """One loaded version of a served model."""

    name: str
    version: int
    flavor: str
    sha256: str
    predictor: Predictor
    service: str | None
    builder: InputBuilder | None
    device: str
    precision: str

    @property
    def signature(self) -> Signature:
        return self.predictor.signature


def device_and_precision(config: ServedModelConfig) -> tuple[str, str]:
    """Where a torch model runs and in what precision: a GPU when Ray gave this process one
    (``bf16`` there under ``precision: auto``), else the CPU in ``fp32``. Ray names the GPUs it
    assigns in ``CUDA_VISIBLE_DEVICES``; without one, torch is not even imported (a replica
    serving only LightGBM models never loads it)."""
    gpu = False
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        try:
            import torch

            gpu = torch.cuda.is_available()
        except ImportError:
            gpu = False
    device = "cuda" if gpu else "cpu"
    precision = config.precision if config.precision != "auto" else ("bf16" if gpu else "fp32")
    return device, precision


def load_builder(path: str) -> InputBuilder:
    """The function ``'package.module:function'`` names.

    Raises:
        ModelError: it cannot be imported or is not callable.
    """
    module_name, _, attr = path.partition(":")
    try:
        builder = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"input builder {path!r} cannot be imported: {exc}") from None
    if not callable(builder):
        raise ModelError(f"input builder {path!r} is not a function")
    return builder


class ServedModel:
    """One configured model in this process: its alias followed live, its version loaded."""

    def __init__(
        self, config: ServedModelConfig, *, models: ModelRegistry, catalog: FeatureCatalog, default_service: str | None = None, poll_s: float = 1.0
    ) -> None:
        self.config = config
        self.models = models
        self.catalog = catalog
        self.default_service = default_service
        self.device, self.precision = device_and_precision(config)
        aliases = (config.alias, config.shadow_alias) if config.shadow_alias else (config.alias,)
        self.watcher: ModelWatcher[ServedVersion] = ModelWatcher(models, config.name, load=self._load, aliases=aliases, poll_s=poll_s)

    def start(self) -> None:
        self.watcher.poll()
        self.watcher.start()

    def stop(self) -> None:
        self.watcher.stop()

    def current(self) -> ServedVersion | None:
        return self.watcher.current(self.config.alias)

    def shadow(self) -> ServedVersion | None:
        """The version under ``shadow_alias`` when it is set and differs from the served one."""
        if not self.config.shadow_alias:
            return None
        candidate = self.watcher.current(self.config.shadow_alias)
        current = self.current()
        return None if candidate is None or (current is not None and candidate.version == current.version) else candidate

    def _load(self, version: int) -> ServedVersion:
        mv, predictor = self.models.load_predictor(self.config.name, version=version, device=self.device, precision=self.precision)
        path = self.config.input_builder or mv.flavor_config.get("input_builder")
        builder = load_builder(path) if path else None
        service = self.config.feature_service
        if service is None and isinstance(mv.lineage.get("feature_service"), str):
            service = mv.lineage["feature_service"]
        if service is None and builder is None:
            service = self.default_service
        if builder is None and service is not None:
            self._check_service(service, predictor.signature, version)
        return ServedVersion(
            mv.name, mv.version, mv.flavor, mv.artifacts[mv.model_file], predictor, service, builder, self.device, self.precision
        )

    def _check_service(self, service: str, signature: Signature, version: int) -> None:
        provided = {ref.split(":", 1)[1] for ref in self.catalog.service_refs(service)}
        missing = [t.name for t in signature.inputs if t.name not in provided]
        if missing:
            raise ModelError(
                f"model {self.config.name} v{version} takes inputs {missing} that feature service {service!r} does not provide"
            )

    def score_rows(self, entities: Mapping[str, Sequence[Any]], output: str, timeout_s: float | None = None) -> ModelScores:
        """Score column-wise entities now (in this thread, no batching: a decision's batch is
        already one), reading output ``output``.

        Raises:
            NotFoundError: no loadable version; DataError / PlatformError: as ``build_inputs``.
        """
        return _score_now(self, entities, output)

    def build_inputs(self, served: ServedVersion, entities: Mapping[str, Sequence[Any]]) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
        """The model's input for column-wise entity keys and request fields, and what it was
        made of (per feature: values, statuses, event timestamps; for a built input, the arrays).

        Raises:
            DataError: bad entities, or values the model cannot take.
            PlatformError: the online store failed.
        """
        from mlplatform.features.online_lookup import get_online_features

        lengths = {len(v) for v in entities.values()}
        if len(lengths) != 1:
            raise DataError(f"every entities column must have one length, got { {k: len(v) for k, v in entities.items()} }")
        if served.builder is not None:
            rows = _rows(entities)
            built = served.builder(self.catalog, rows, served.signature)
            inputs = conform({k: np.asarray(v) for k, v in built.items()}, served.signature)
            return inputs, [{"name": k, "values": v.tolist()} for k, v in inputs.items()]
        if served.service is None:
            raise DataError(f"model {served.name!r} has no feature service nor input builder: call /v2/models/{served.name}/infer")
        from mlplatform.serving.scoring import service_inputs

        needed = service_inputs(self.catalog, self.catalog.service_refs(served.service))
        response = get_online_features(self.catalog, served.service, {k: v for k, v in entities.items() if k in needed})
        doc = response.to_json_dict()
        names = doc["metadata"]["feature_names"]
        columns = {n: r for n, r in zip(names, doc["results"])}
        inputs = {}
        for spec in served.signature.inputs:
            values = columns[spec.name]["values"]
            if spec.datatype == "BYTES":
                inputs[spec.name] = np.array([None if v is None else str(v) for v in values], dtype=object)
            else:
                try:
                    array = np.array([np.nan if v is None else v for v in values], dtype=DATATYPES[spec.datatype])
                except (TypeError, ValueError, OverflowError):
                    raise DataError(f"feature {spec.name!r} has values the model cannot take as {spec.datatype}") from None
                inputs[spec.name] = array
        features = [{"name": n, **r} for n, r in columns.items() if n in inputs or not served.signature.inputs]
        return inputs, features


@dataclass(frozen=True)
class ModelScores:
    """One model's scores for a batch of rows, as the decision logs them: the version that
    scored, one score per row, and each row's input (JSON-able) so replay can recompute it."""

    name: str
    version: int
    sha256: str
    flavor: str
    scores: list[float]
    inputs: list[dict[str, Any]]
    #: The fixed batch size the scores were computed in (``predict_in_fixed_batches``).
    rows: int = DECISION_ROWS
    #: Per row, the shadow version's score (``{"alias", "model_version", "score"}`` or an ``error``), when one is set.
    shadow: list[dict[str, Any]] | None = None


def scores_of(served: ServedVersion, output: str, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> ModelScores:
    """``ModelScores`` from a scored batch (``output`` names the score).

    Raises:
        DataError: the model gives no output of that name.
    """
    if output not in outputs:
        raise DataError(f"model {served.name!r} gives no output {output!r}; it gives {list(outputs)}")
    n = len(outputs[output])
    rows = [{k: v[i].tolist() for k, v in inputs.items()} for i in range(n)]
    return ModelScores(served.name, served.version, served.sha256, served.flavor, [float(x) for x in outputs[output]], rows)


def _rows(entities: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Column-wise entities as rows; ``timestamp`` (ISO 8601 or a datetime; default now) becomes
    a UTC datetime."""
    from mlplatform.timestamps import parse_instant

    n = len(next(iter(entities.values()))) if entities else 0
    now = datetime.now(UTC)
    rows = [{k: v[i] for k, v in entities.items()} for i in range(n)]
    for i, row in enumerate(rows):
        stamp = row.get("timestamp")
        row["timestamp"] = now if stamp is None else parse_instant(stamp, f"entities.timestamp[{i}]")
    return rows


def _score_now(model: ServedModel, entities: Mapping[str, Sequence[Any]], output: str) -> ModelScores:
    served = model.current()
    if served is None:
        raise NotFoundError(f"model {model.config.name!r} has no loadable version under alias {model.config.alias!r}")
    inputs, _ = model.build_inputs(served, entities)
    scores = scores_of(served, output, inputs, predict_in_fixed_batches(served.predictor, inputs, DECISION_ROWS))
    candidate = model.shadow()
    if candidate is None:
        return scores
    head = {"alias": model.config.shadow_alias, "model_version": candidate.version}
    try:  # the shadow must never affect the decision
        shadow_inputs = inputs if (candidate.builder, candidate.service) == (served.builder, served.service) else model.build_inputs(candidate, entities)[0]
        predicted = predict_in_fixed_batches(candidate.predictor, shadow_inputs, DECISION_ROWS)
        shadow = [{**head, "score": s} for s in scores_of(candidate, output, shadow_inputs, predicted).scores]
    except Exception as exc:
        shadow = [{**head, "error": repr(exc)[:300]}] * len(scores.scores)
    return dataclasses.replace(scores, shadow=shadow)


class RemoteModel:
    """A model in its own deployment, scored synchronously from a decision's thread."""

    def __init__(self, name: str, handle: Any) -> None:
        self.name = name
        self.handle = handle

    def score_rows(self, entities: Mapping[str, Sequence[Any]], output: str, timeout_s: float) -> ModelScores:
        """As ``ServedModel.score_rows``, through the deployment (``timeout_s`` bounds the call)."""
        result = self.handle.score_rows.remote(dict(entities), output).result(timeout_s=timeout_s)
        if isinstance(result, Exception):
            raise result
        return result


class ModelBatcher:
    """Dynamic batching of one model's calls in this process (see the module docstring)."""

    def __init__(self, model: ServedModel, executor: ThreadPoolExecutor) -> None:
        self.model = model
        self._executor = executor
        batching = model.config.batching
        self._batched.set_max_batch_size(batching.max_batch_size)
        self._batched.set_batch_wait_timeout_s(batching.max_wait.total_seconds())
        self.batches = [0, 0]  # batches, calls

    async def infer(self, inputs: dict[str, np.ndarray]) -> tuple[ServedVersion, dict[str, np.ndarray]]:
        """Score one request's rows with whatever else queued; its version and its outputs.

        Raises:
            NotFoundError: no loadable version under the alias.
            DataError: the inputs do not fit the model.
        """
        result = await self._batched(inputs)
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _batched(self, calls: list[dict[str, np.ndarray]]) -> list[Any]:
        self.batches[0] += 1
        self.batches[1] += len(calls)
        served = self.model.current()
        if served is None:
            error = NotFoundError(f"model {self.model.config.name!r} has no loadable version under alias {self.model.config.alias!r}")
            return [error] * len(calls)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, _score_calls, served, calls)


def _score_calls(served: ServedVersion, calls: list[dict[str, np.ndarray]]) -> list[Any]:
    """Each call's outputs: calls whose inputs have the same per-row shapes are scored as one
    concatenated batch and split back; a call that fails alone gets its own error."""
    out: list[Any] = [None] * len(calls)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, inputs in enumerate(calls):
        try:
            calls[i] = conform(inputs, served.signature)
        except DataError as exc:
            out[i] = exc
            continue
        key = tuple((k, v.shape[1:], v.dtype.str) for k, v in sorted(calls[i].items()))
        groups.setdefault(key, []).append(i)
    for members in groups.values():
        sizes = [next(iter(calls[i].values())).shape[0] for i in members]
        merged = {k: np.concatenate([calls[i][k] for i in members]) for k in calls[members[0]]}
        try:
            outputs = served.predictor.predict(merged)
        except DataError as exc:
            if len(members) == 1:
                out[members[0]] = exc
                continue
            for i in members:  # someone's rows are bad: find out whose
                out[i] = _score_calls(served, [calls[i]])[0]
            continue
        start = 0
        for i, n in zip(members, sizes):
            out[i] = (served, {k: v[start : start + n] for k, v in outputs.items()})
            start += n
    return out


class ModelServer:
    """The models this replica serves, by name (local ones and handles to model deployments)."""

    def __init__(self, local: Mapping[str, ServedModel], remote: Mapping[str, Any], executor: ThreadPoolExecutor) -> None:
        self.local = dict(local)
        self.remote = dict(remote)
        self.batchers = {name: ModelBatcher(model, executor) for name, model in self.local.items()}
        self._executor = executor

    @classmethod
    def build(
        cls,
        configs: Sequence[ServedModelConfig],
        *,
        models: ModelRegistry,
        catalog: FeatureCatalog,
        handles: Mapping[str, Any],
        default_services: Mapping[str, str],
        poll_s: float = 1.0,
        threads: int = 2,
    ) -> ModelServer:
        local = {
            c.name: ServedModel(c, models=models, catalog=catalog, default_service=default_services.get(c.name), poll_s=poll_s)
            for c in configs
            if c.deployment is None
        }
        executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="model-server")
        server = cls(local, {c.name: handles[c.name] for c in configs if c.deployment is not None}, executor)
        for model in local.values():
            model.start()
        return server

    def names(self) -> list[str]:
        return sorted({*self.local, *self.remote})

    def scorer(self, name: str) -> ServedModel | RemoteModel:
        """What scores ``name`` synchronously for a decision (``score_rows``).

        Raises:
            NotFoundError: ``name`` is not served here.
        """
        self._need(name)
        return self.local[name] if name in self.local else RemoteModel(name, self.remote[name])

    def stop(self) -> None:
        for model in self.local.values():
            model.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _need(self, name: str) -> None:
        if name not in self.local and name not in self.remote:
            raise NotFoundError(f"no model {name!r} is served here; served: {self.names()}")

    async def describe(self, name: str) -> dict[str, Any] | None:
        """``{"name", "version", "flavor", "sha256", "signature", "service", "device", "precision"}``
        of the version serving now (None: none loadable).

        Raises:
            NotFoundError: ``name`` is not served here.
        """
        self._need(name)
        if name in self.remote:
            return await self.remote[name].describe.remote()
        served = self.local[name].current()
        return None if served is None else describe(served)

    async def infer(self, name: str, inputs: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Outputs of ``name`` for ``inputs`` (conformed to its signature), and the version's description.

        Raises:
            NotFoundError: not served here, or no loadable version.
            DataError: the inputs do not fit the model.
        """
        self._need(name)
        if name in self.remote:
            result = await self.remote[name].infer.remote(inputs)
            if isinstance(result, Exception):
                raise result
            return result
        served, outputs = await self.batchers[name].infer(inputs)
        return describe(served), outputs

    async def predict(self, name: str, entities: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
        """Feature-aware prediction: the input built online, scored; the outputs with the features.

        Raises:
            NotFoundError: not served here, or no loadable version.
            DataError: bad entities or values; PlatformError: the online store failed.
        """
        self._need(name)
        if name in self.remote:
            result = await self.remote[name].predict.remote(dict(entities))
            if isinstance(result, Exception):
                raise result
            return result
        model = self.local[name]
        served = model.current()
        if served is None:
            raise NotFoundError(f"model {name!r} has no loadable version under alias {model.config.alias!r}")
        loop = asyncio.get_running_loop()
        inputs, features = await loop.run_in_executor(self._executor, model.build_inputs, served, entities)
        scored, outputs = await self.batchers[name].infer(inputs)
        return {
            "model_name": name,
            "model_version": str(scored.version),
            "outputs": {k: _json_list(v) for k, v in outputs.items()},
            "features": features,
        }


def describe(served: ServedVersion) -> dict[str, Any]:
    return {
        "name": served.name,
        "version": served.version,
        "flavor": served.flavor,
        "sha256": served.sha256,
        "signature": served.signature,
        "service": served.service,
        "device": served.device,
        "precision": served.precision,
    }


def _json_list(array: np.ndarray) -> list[Any]:
    values = array.tolist()
    if array.dtype.kind == "f":
        return _clean(values)
    return values


def _clean(values: Any) -> Any:
    if isinstance(values, list):
        return [_clean(v) for v in values]
    return None if isinstance(values, float) and not math.isfinite(values) else values
