"""Models on the request path: a loaded version ready to score, and the alias watcher that
rolls a running replica onto whatever version an alias points at.

    load = scorer_loader(platform.models, catalog, "underwriting", default_service="underwriting_v1")
    watcher = ModelWatcher(platform.models, "underwriting", load=load, aliases=("production", "candidate"))
    watcher.start()                        # polls the alias documents every second
    scorer = watcher.current("production") # a Scorer, swapped atomically when the alias moves
    scorer.predict(scorer.matrix(rows))

Rollout: ``platform.models.set_alias(name, "production", v)`` writes one alias document. Each
replica's watcher reads the alias documents every ``poll_s`` seconds; when a target moves it
loads the new version in its own thread (sha256-verified, feature names checked against the
feature service), and only then swaps the reference the request path reads. A request uses
the scorer it read at its start, so no request is dropped or mixes two versions, and a version
that fails to load is reported and skipped while the previous one keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

from mlplatform.errors import ModelError, PlatformError
from mlplatform.models.reasons import ReasonCoder, reason_texts_from_definitions

if TYPE_CHECKING:
    from mlplatform.models.registry import ModelRegistry
    from mlplatform.serving.catalog import FeatureCatalog

__all__ = ["ModelWatcher", "Scorer", "load_scorer", "scorer_loader", "service_inputs"]

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Scorer:
    """One model version ready to score: its booster, the features it reads (in the booster's
    ``feature_name()`` order) and the feature service that provides them."""

    name: str
    version: int
    sha256: str
    booster: Any
    feature_names: tuple[str, ...]
    service: str
    refs: tuple[str, ...]
    inputs: tuple[str, ...]
    coder: ReasonCoder = field(repr=False)

    def matrix(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """The model input, one row per mapping, encoded by ``models.encoding.encode_features`` (the
        booster's column order; None → NaN; categories by the model's lists), so the logged
        score is the one replay recomputes, bit for bit.

        Raises:
            DataError: a value of a numeric feature is not a number.
        """
        from mlplatform.models.encoding import encode_features

        if not rows:
            return np.empty((0, len(self.feature_names)))
        return np.vstack([encode_features(self.booster, row) for row in rows])

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Probability of default per row (``Booster.predict``: the same call replay uses)."""
        return self.booster.predict(x, num_threads=1)


def load_scorer(
    models: ModelRegistry,
    catalog: FeatureCatalog,
    name: str,
    version: int,
    default_service: str,
    available_inputs: Collection[str] | None = None,
) -> Scorer:
    """Load ``name`` v``version`` (checksums verified) and match it to its feature service.

    The service is the version's ``lineage["feature_service"]``, else ``default_service``.
    ``inputs`` are the entity columns its features need (join keys, then request fields);
    with ``available_inputs`` (the fields of a decision request) each must be among them.

    Raises:
        ModelError: not a single-output LightGBM model, it needs features the service does
            not provide, or its service needs inputs a request does not carry.
        NotFoundError / IntegrityError: as ``ModelRegistry.load``.
    """
    loaded = models.load(name, version=version)
    mv = loaded.version
    if mv.flavor != "lightgbm":
        raise ModelError(f"model {name} v{version} is a {mv.flavor!r} model; the decision endpoint serves LightGBM models")
    service = mv.lineage.get("feature_service") if isinstance(mv.lineage.get("feature_service"), str) else default_service
    refs = catalog.service_refs(service)
    provided = {ref.split(":", 1)[1] for ref in refs}
    booster = loaded.model
    names = tuple(booster.feature_name())
    missing = [n for n in names if n not in provided]
    if missing:
        raise ModelError(
            f"model {name} v{version} reads features {missing} that feature service {service!r} does not provide "
            f"(it provides {sorted(provided)})"
        )
    inputs = service_inputs(catalog, refs)
    if available_inputs is not None and any(i not in available_inputs for i in inputs):
        raise ModelError(
            f"feature service {service!r} of model {name} v{version} needs inputs {list(inputs)}; "
            f"a decision request carries {sorted(available_inputs)}"
        )
    texts = reason_texts_from_definitions(refs, catalog)
    coder = ReasonCoder(booster, texts)
    return Scorer(name, mv.version, mv.artifacts[mv.model_file], booster, names, service, tuple(refs), inputs, coder)


def scorer_loader(
    models: ModelRegistry,
    catalog: FeatureCatalog,
    name: str,
    default_service: str,
    available_inputs: Collection[str] | None = None,
) -> Callable[[int], Scorer]:
    """``version → Scorer`` for a ``ModelWatcher`` of the decision model (see ``load_scorer``)."""
    return lambda version: load_scorer(models, catalog, name, version, default_service, available_inputs)


def service_inputs(catalog: FeatureCatalog, refs: Sequence[str]) -> tuple[str, ...]:
    """The entity columns the features ``refs`` need: join keys, then request fields."""
    from mlplatform.features.definitions import FeatureView, RequestSource

    names: list[str] = []
    for ref in refs:
        view = catalog.resolve_view(ref.split(":", 1)[0])
        if isinstance(view, FeatureView):
            names.extend(view.join_keys)
            continue
        for source in view.sources:
            if isinstance(source, RequestSource):
                names.extend(f.name for f in source.schema_)
            else:
                names.extend(source.join_keys)
    return tuple(dict.fromkeys(names))


class ModelWatcher(Generic[T]):
    """Keeps what ``load`` made of each watched alias's version current (see the module docstring).

        watcher = ModelWatcher(platform.models, "underwriting", load=scorer_loader(platform.models, catalog, "underwriting"))

    Args:
        name: the registered model.
        load: ``version → loaded`` (a ``Scorer``, a served predictor …); it may raise, and
            then the version is reported in ``failed()`` and not tried again.
        aliases: the aliases to follow; the first is the one decisions use.
        poll_s: seconds between reads of the alias documents.
        on_change: called ``(alias, loaded or None)`` after each swap (metrics, logs).
    """

    def __init__(
        self,
        models: ModelRegistry,
        name: str,
        *,
        load: Callable[[int], T],
        aliases: Sequence[str] = ("production",),
        poll_s: float = 1.0,
        on_change: Callable[[str, T | None], None] | None = None,
    ) -> None:
        self.models = models
        self.name = name
        self.load = load
        self.aliases = tuple(dict.fromkeys(aliases))
        self.poll_s = poll_s
        self.on_change = on_change
        self._current: dict[str, tuple[int, T] | None] = {a: None for a in self.aliases}
        self._failed: dict[int, str] = {}  # version -> why it could not be loaded (not retried)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

    def current(self, alias: str) -> T | None:
        """What ``alias`` points at now, loaded (None: unset, or not loadable)."""
        held = self._current.get(alias)
        return held[1] if held is not None else None

    def current_version(self, alias: str) -> int | None:
        held = self._current.get(alias)
        return held[0] if held is not None else None

    def failed(self) -> dict[int, str]:
        return dict(self._failed)

    def poll(self) -> bool:
        """Read the alias documents once and load what moved; True if anything was swapped."""
        try:
            targets = self.models.aliases(self.name)
        except PlatformError as exc:
            self.last_error = f"reading the aliases of {self.name!r}: {exc}"
            return False
        changed = False
        loaded: dict[int, T] = {held[0]: held[1] for held in self._current.values() if held is not None}
        for alias in self.aliases:
            version = targets.get(alias)
            if self.current_version(alias) == version:
                continue
            if version is None:
                held = None
            elif version in loaded:
                held = (version, loaded[version])
            elif version in self._failed:
                continue
            else:
                try:
                    held = (version, self.load(version))
                except Exception as exc:  # a bad version must not stop the replica: keep serving the old one
                    self._failed[version] = f"{type(exc).__name__}: {exc}"
                    self.last_error = f"{self.name} v{version} ({alias}) not loaded: {exc}"
                    log.error("%s", self.last_error)
                    continue
                loaded[version] = held[1]
            self._current = {**self._current, alias: held}  # one reference swap: readers see old or new
            changed = True
            log.info("%s: alias %s now serves version %s", self.name, alias, version)
            if self.on_change is not None:
                self.on_change(alias, held[1] if held else None)
        return changed

    def start(self) -> None:
        """Poll in a daemon thread until ``stop``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"model-watcher-{self.name}", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            started = time.monotonic()
            self.poll()
            if time.monotonic() - started > 10 * self.poll_s:
                log.warning("polling the aliases of %s took %.1fs", self.name, time.monotonic() - started)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
