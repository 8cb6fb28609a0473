"""The model registry: numbered versions, aliases, lineage and checksummed artifacts.

    mv = platform.models.register("pd", flavor="lightgbm", model=booster, lineage={...},
                                  metrics={"test_auc": 0.81}, params=params, files=card_files)
    platform.models.set_alias("pd", "production", mv.version)
    loaded = platform.models.load("pd", alias="production")   # checksums verified
    loaded.model.predict(X)
    mv, predictor = platform.models.load_predictor("fraud", alias="production", device="cuda")
    predictor.predict({"event_type": ..., ...})["probability"]

Layout under the storage root::

    models/<name>/artifacts/<stamp>-<uuid>/<file>   model file and extra files (e.g. the model card)
    models/<name>/versions/<n:08d>.json             the version record: artifacts with sha256, lineage…
    models/<name>/aliases/<alias>.json              {"version": n, …}: one document per alias
    models/<name>/alias_history/<alias>/<t>-<id>.json   every move and refused promotion

Registration writes the artifacts to a fresh, unique folder first and only then claims a
version number by creating its record exclusively (``Storage.create_json``: hard link on
local disk, ``If-None-Match: *`` on S3). Losing the race for ``n`` means someone else holds
``n``; the writer tries ``n + 1``. So numbers are unique, and gapless because a number is
taken only by a complete record whose artifacts already exist. The artifacts are not under
``versions/<n>/`` because ``n`` is unknown until the claim succeeds, and moving them after
it would leave a moment when a published record points at missing files. A writer that dies
before its claim leaves an unreferenced artifacts folder and no version.
"""

from __future__ import annotations

import math
import os
import platform as _pyplatform
import re
import subprocess
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import UTC, date, datetime
from functools import cache
from importlib import metadata
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

from mlplatform.errors import ConflictError, ModelError, NotFoundError
from mlplatform.models.artifacts import deserialize
from mlplatform.models.flavors import get_flavor

if TYPE_CHECKING:
    from mlplatform.models.alias_history import AliasEvent, Outcome
    from mlplatform.models.flavors import Predictor
    from mlplatform.models.gate import Evaluator
    from mlplatform.storage import Storage

__all__ = ["LoadedModel", "ModelRegistry", "ModelVersion", "complete_lineage", "library_versions"]

PREFIX = "models"
RECORD_FORMAT = "mlplatform.model_version/1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_ALIAS = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_RECORD = re.compile(r"^(\d+)\.json$")
_LIBRARIES = ("lightgbm", "torch", "ray", "pyarrow", "numpy", "pandas", "safetensors", "mlplatform")
_MAX_CLAIMS = 100_000


@dataclass(frozen=True)
class ModelVersion:
    """One registered version: what it is, where its bytes are and where it came from.

    ``artifacts`` maps each stored file to its sha256; ``model_file`` names the one holding
    the model. ``flavor_config`` is what the flavor needs besides the files to build a
    predictor (for ``torch``: ``class``, ``config``, ``signature``, ``transform``; ``{}`` for
    ``lightgbm``, for torch weights registered without one, and in records written before
    flavors had configs). ``uri`` is the folder the artifacts live in. ``aliases`` are the
    aliases that pointed at this version when it was read.
    """

    name: str
    version: int
    flavor: str
    artifacts: dict[str, str]
    model_file: str
    lineage: dict[str, Any]
    metrics: dict[str, Any]
    params: dict[str, Any]
    description: str
    created_at: datetime
    uri: str
    aliases: tuple[str, ...] = ()
    artifact_prefix: str = field(default="", repr=False)
    flavor_config: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_record(cls, record: Mapping[str, Any], *, uri: str, aliases: tuple[str, ...] = ()) -> ModelVersion:
        return cls(
            name=record["name"],
            version=int(record["version"]),
            flavor=record["flavor"],
            artifacts={f: a["sha256"] for f, a in record["artifacts"].items()},
            model_file=record["model_file"],
            lineage=record["lineage"],
            metrics=record["metrics"],
            params=record["params"],
            description=record.get("description", ""),
            created_at=datetime.fromisoformat(record["created_at"]),
            uri=uri,
            aliases=aliases,
            artifact_prefix=record["artifact_prefix"],
            flavor_config=record.get("flavor_config") or {},
        )


@dataclass(frozen=True)
class LoadedModel:
    """A verified, deserialised version: ``model`` is a ``lightgbm.Booster`` or a torch state
    dict (``dict[str, Tensor]``); ``files`` holds the extra files (model card…) by name."""

    version: ModelVersion
    model: Any
    files: dict[str, bytes]


class ModelRegistry:
    """Model versions under ``models/`` of the platform's storage root (``platform.models``).

    Args:
        storage: the storage root.
        evaluate_promotion: the promotion gate's comparison of a candidate with the production
            version (``mlplatform.evaluation.promotion.PromotionEvaluator``; ``Platform`` wires
            it). Without one, ``production`` moves by ``promote`` only when nothing is there
            yet, or by force.
    """

    def __init__(self, storage: Storage, *, evaluate_promotion: Evaluator | None = None) -> None:
        self.storage = storage
        self.evaluate_promotion = evaluate_promotion

    def __repr__(self) -> str:
        return f"ModelRegistry({self.storage.uri(PREFIX)!r})"

    # ------------------------------------------------------------------------ writing
    def register(
        self,
        name: str,
        *,
        flavor: str,
        model: Any,
        lineage: Mapping[str, Any],
        metrics: Mapping[str, Any],
        params: Mapping[str, Any],
        files: Mapping[str, bytes] | None = None,
        description: str = "",
        flavor_config: Mapping[str, Any] | None = None,
    ) -> ModelVersion:
        """Store ``model`` and its files, then publish them as the next version of ``name``.

            mv = platform.models.register("pd", flavor="lightgbm", model=booster,
                                          lineage={"training_set": snapshot, "feature_service": "underwriting_v1"},
                                          metrics={"test_auc": 0.81}, params=params)

        Args:
            flavor: ``"lightgbm"`` (a Booster, stored as LightGBM's text model) or ``"torch"``
                (an ``nn.Module`` or state dict, stored as safetensors). Never pickle.
            flavor_config: what the flavor needs to build a predictor, stored in the version
                record (``ModelVersion.flavor_config``). ``lightgbm``: none. ``torch``:
                ``{"class": "pkg.module:Class", "config": {...}, "signature": {"inputs": [...],
                "outputs": [...]}, "transform": "sigmoid" | "none"}`` — ``class`` defaults to the
                module's own class, ``config`` to ``{}``, ``transform`` to ``"none"``; the
                class is built from the config and the weights must fit it (see
                ``mlplatform.models.flavors.torch``). A torch model registered without one is
                weights only: ``load`` returns its state dict, ``load_predictor`` refuses it.
            lineage: where the model came from. ``training_set`` may be a ``TrainingSetSnapshot``
                or its dict; from it ``feature_versions`` and ``data_time_range`` are filled in
                when not given. ``code_version`` (``git rev-parse HEAD`` of the working
                directory, None outside a checkout), ``code_dirty``, ``libraries`` (python,
                lightgbm, torch, ray, pyarrow, … versions) are filled in when not given;
                ``artifacts`` (file → sha256) is always set.
            metrics, params: JSON-able mappings. NaN and infinities are stored as null.
            files: extra files, e.g. the model card's Markdown and PNGs (name → bytes), stored
                and checksummed like the model. Names are plain file names.

        Returns:
            The new ``ModelVersion``; its number is unique and versions have no gaps, however
            many processes register at once.

        Raises:
            ModelError: bad name, flavor, model, flavor_config or file name.
        """
        _check_name(name)
        chosen = get_flavor(flavor)
        model_file = chosen.model_file
        saved = chosen.save(model, flavor_config)
        blobs = dict(saved.files)
        for fname, data in (files or {}).items():
            if not isinstance(fname, str) or not _NAME.match(fname) or fname in saved.files:
                raise ModelError(f"bad file name {fname!r}: use a plain name like 'model_card.md', not one of {sorted(saved.files)}")
            if not isinstance(data, bytes | bytearray | memoryview):
                raise ModelError(f"file {fname!r} must be bytes, got {type(data).__name__}")
            blobs[fname] = bytes(data)

        created_at = datetime.now(UTC)
        prefix = f"{PREFIX}/{name}/artifacts/{created_at:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:12]}"
        artifacts = {
            fname: {"sha256": self.storage.write_artifact(f"{prefix}/{fname}", data), "bytes": len(data)}
            for fname, data in blobs.items()
        }
        record = {
            "format": RECORD_FORMAT,
            "name": name,
            "version": None,
            "flavor": flavor,
            "flavor_config": _jsonable(saved.config),
            "model_file": model_file,
            "artifact_prefix": prefix,
            "artifacts": artifacts,
            "lineage": {**complete_lineage(lineage), "artifacts": {f: a["sha256"] for f, a in artifacts.items()}},
            "metrics": _jsonable(dict(metrics)),
            "params": _jsonable(dict(params)),
            "description": description,
            "created_at": created_at.isoformat(),
        }
        n = self._latest(name) + 1
        for _ in range(_MAX_CLAIMS):
            record["version"] = n
            if self.storage.create_json(self._record_key(name, n), record):
                return ModelVersion.from_record(record, uri=self.storage.uri(prefix))
            n += 1  # someone else holds n, so n exists: trying n + 1 cannot leave a gap
        raise ConflictError(f"could not claim a version of model {name!r} after {_MAX_CLAIMS} attempts")

    def set_alias(self, name: str, alias: str, version: int) -> ModelVersion:
        """Point ``alias`` (e.g. ``production``, ``candidate``) at ``version``, moving it if set,
        with no promotion gate (``promote`` is the gated way to production); the move is
        recorded in the alias history with outcome ``set``.

        One atomic JSON write: a reader sees the old target or the new one. Each alias is its
        own document, so moving one never loses a concurrent move of another.

        Raises:
            ModelError: the alias name is invalid (lowercase letter first, then ``a-z 0-9 _ -``).
            NotFoundError: the model or version does not exist.
        """
        from mlplatform.models.alias_history import current_user

        self.check_alias(alias)
        target = self.get(name, version=version)
        self.move_alias(name, alias, target.version, outcome="set", by=current_user(), reason=None, decision=None)
        return self.get(name, version=target.version)

    def promote(
        self,
        name: str,
        version: int,
        alias: str = "production",
        *,
        force: bool = False,
        reason: str | None = None,
        by: str | None = None,
    ) -> AliasEvent:
        """Point ``alias`` at ``version``; ``production`` only if the promotion gate passes.

            platform.models.promote("underwriting", 7)
            platform.models.promote("underwriting", 7, force=True, reason="label fix; AUC drop expected")

        The gate compares the version with the one in production on the same out-of-time rows
        (AUC margin, score PSI, calibration; ``mlplatform.models.gate`` says exactly how) and
        refuses with every figure unless ``force=True`` with a ``reason``. Every outcome —
        promoted, forced, refused — is recorded in ``alias_history`` with the figures, who
        (``by``, default ``MLP_USER`` or the login name), when and why. Other aliases move
        without the gate.

        Raises:
            PromotionRefused: the gate failed (``.decision`` holds the figures); nothing moved.
            ModelError: ``force`` without a ``reason``, or a bad alias.
            NotFoundError: no such model or version.
        """
        from mlplatform.models.gate import promote

        return promote(self, self.evaluate_promotion, name, version, alias, force=force, reason=reason, by=by)

    def alias_history(self, name: str, alias: str | None = None) -> list[AliasEvent]:
        """Every alias move and refused promotion of ``name`` (of one ``alias``), oldest first."""
        from mlplatform.models.alias_history import read_history

        _check_name(name)
        if alias is not None:
            self.check_alias(alias)
        return read_history(self.storage, name, alias)

    def check_alias(self, alias: str) -> str:
        """``alias`` if it is a valid alias name.

        Raises:
            ModelError: it is not (lowercase letter first, then ``a-z 0-9 _ -``).
        """
        if not isinstance(alias, str) or not _ALIAS.match(alias):
            raise ModelError(f"bad alias {alias!r}: start with a lowercase letter, then a-z, 0-9, _ or -, e.g. 'production'")
        return alias

    def move_alias(
        self, name: str, alias: str, version: int, *, outcome: Outcome, by: str, reason: str | None, decision: dict[str, Any] | None
    ) -> AliasEvent:
        """The move ``set_alias`` and ``promote`` share: one atomic write of the alias document
        (carrying the outcome, who, why and the gate's decision), then its history record.
        It checks nothing: call ``set_alias`` or ``promote``."""
        from mlplatform.models.alias_history import AliasEvent, record_event

        at = datetime.now(UTC)
        event = AliasEvent(
            model=name, alias=alias, version=version, previous=self.aliases(name).get(alias),
            outcome=outcome, at=at, by=by, reason=reason, decision=decision,
        )
        self.storage.write_json(
            self._alias_key(name, alias),
            {"alias": alias, "version": version, "previous": event.previous, "set_at": at.isoformat(),
             "outcome": outcome, "by": by, "reason": reason, "decision": decision},
        )
        record_event(self.storage, event)
        return event

    # ------------------------------------------------------------------------ reading
    def names(self) -> list[str]:
        """Names of models with at least one version, sorted."""
        return [n for n in self.storage.list(PREFIX) if self._versions(n)]

    def list(self, name: str) -> list[ModelVersion]:
        """Every version of ``name``, oldest first.

        Raises:
            NotFoundError: no version of ``name`` exists.
        """
        numbers = self._versions(name)
        if not numbers:
            raise self._unknown_model(name)
        by_version = _invert(self.aliases(name))
        return [self._read(name, n, by_version) for n in numbers]

    def aliases(self, name: str) -> dict[str, int]:
        """``{alias: version}`` for ``name`` (empty when none is set)."""
        _check_name(name)
        out = {}
        for entry in self.storage.list(f"{PREFIX}/{name}/aliases"):
            if entry.endswith(".json") and _ALIAS.match(entry[:-5]):
                out[entry[:-5]] = int(self.storage.read_json(f"{PREFIX}/{name}/aliases/{entry}")["version"])
        return out

    def get(self, name: str, version: int | None = None, alias: str | None = None) -> ModelVersion:
        """One version of ``name``: ``version``, the target of ``alias``, or the latest.

        Raises:
            ModelError: both ``version`` and ``alias`` were given.
            NotFoundError: the model, version or alias does not exist (the message lists what does).
        """
        _check_name(name)
        if version is not None and alias is not None:
            raise ModelError(f"give version or alias, not both (got version={version!r}, alias={alias!r})")
        aliases = self.aliases(name)
        if alias is not None:
            if alias not in aliases:
                if not self._versions(name):
                    raise self._unknown_model(name)
                raise NotFoundError(
                    f"model {name!r} has no alias {alias!r}; its aliases: {aliases or 'none'} "
                    f"(set one with platform.models.set_alias({name!r}, {alias!r}, version))"
                )
            version = aliases[alias]
        if version is None:
            version = self._latest(name)
            if version == 0:
                raise self._unknown_model(name)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ModelError(f"version must be a positive integer, got {version!r}")
        return self._read(name, version, _invert(aliases))

    def load(self, name: str, version: int | None = None, alias: str | None = None) -> LoadedModel:
        """Read a version, verify every artifact's sha256 and deserialise the model.

            booster = platform.models.load("pd", alias="production").model

        Raises:
            IntegrityError: an artifact's bytes changed since registration; nothing is loaded.
            NotFoundError: as for ``get``, or an artifact is missing.
        """
        mv = self.get(name, version=version, alias=alias)
        data = self._verified_files(mv)
        model = deserialize(mv.flavor, data.pop(mv.model_file))
        return LoadedModel(version=mv, model=model, files=data)

    def load_predictor(
        self,
        name: str,
        *,
        version: int | None = None,
        alias: str | None = None,
        device: str = "cpu",
        precision: str = "fp32",
    ) -> tuple[ModelVersion, Predictor]:
        """A version and a predictor built from it by its flavor, every artifact's sha256 verified.

            mv, predictor = platform.models.load_predictor("fraud", alias="production")
            predictor.signature.inputs            # (TensorSpec(name, datatype, shape), ...)
            predictor.predict({...})["probability"]

        The same predictor serves online scoring, batch scoring and replay. ``device``
        (``"cpu"``, ``"cuda"``, ``"cuda:1"``…) and ``precision`` (``"fp32"``, ``"bf16"``) apply
        to torch models; LightGBM runs on the CPU.

        Raises:
            IntegrityError: an artifact's bytes changed since registration; nothing is loaded.
            NotFoundError: as for ``get``, or an artifact is missing.
            ModelError: the flavor cannot build a predictor from the version (a torch version
                holding weights only, a file that is not in the flavor's format — never
                unpickled —, a device that is not available…).
        """
        mv = self.get(name, version=version, alias=alias)
        files = self._verified_files(mv)
        predictor = get_flavor(mv.flavor).load(files, mv.flavor_config, device=device, precision=precision)
        return mv, predictor

    # ---------------------------------------------------------------------- internals
    def _verified_files(self, mv: ModelVersion) -> dict[str, bytes]:
        """Every artifact of ``mv`` by file name, each checked against its recorded sha256."""
        return {f: self.storage.read_artifact(f"{mv.artifact_prefix}/{f}", sha) for f, sha in mv.artifacts.items()}

    def _record_key(self, name: str, version: int) -> str:
        return f"{PREFIX}/{name}/versions/{version:08d}.json"

    def _alias_key(self, name: str, alias: str) -> str:
        return f"{PREFIX}/{name}/aliases/{alias}.json"

    def _versions(self, name: str) -> list[int]:
        _check_name(name)
        found = (_RECORD.match(e) for e in self.storage.list(f"{PREFIX}/{name}/versions"))
        return sorted(int(m.group(1)) for m in found if m)

    def _latest(self, name: str) -> int:
        return max(self._versions(name), default=0)

    def _read(self, name: str, version: int, aliases_by_version: dict[int, tuple[str, ...]]) -> ModelVersion:
        try:
            record = self.storage.read_json(self._record_key(name, version))
        except NotFoundError:
            numbers = self._versions(name)
            if not numbers:
                raise self._unknown_model(name) from None
            raise NotFoundError(
                f"model {name!r} has no version {version}; it has versions {_ranges(numbers)} "
                f"(latest {numbers[-1]}); see platform.models.list({name!r})"
            ) from None
        uri = self.storage.uri(record["artifact_prefix"])
        return ModelVersion.from_record(record, uri=uri, aliases=aliases_by_version.get(version, ()))

    def _unknown_model(self, name: str) -> NotFoundError:
        known = self.names()
        return NotFoundError(
            f"no model named {name!r} is registered under {self.storage.uri(PREFIX)!r}; "
            f"registered: {known or 'none'} (register one with platform.models.register)"
        )


# -------------------------------------------------------------------------- lineage
def complete_lineage(given: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` with what can be found out filled in, as stored by ``register`` (less the
    artifact hashes) and shown by the model card: the training-set snapshot as a dict, its
    ``feature_versions`` and ``data_time_range``, ``code_version``/``code_dirty`` and
    ``libraries``, and ``pipeline_run`` (``MLP_PIPELINE_RUN``, set in a pipeline step's job) — each
    only when not given. JSON-safe."""
    out = dict(given)
    ts = out.get("training_set")
    if ts is not None:
        ts = ts.to_json() if hasattr(ts, "to_json") else dict(ts)
        out["training_set"] = ts
        if ts.get("feature_versions") is not None:
            out.setdefault("feature_versions", ts["feature_versions"])
        if ts.get("time_range") is not None:
            out.setdefault("data_time_range", ts["time_range"])
    # A model trained by a pipeline's job names the run (set by mlplatform.pipelines.kinds).
    if os.environ.get("MLP_PIPELINE_RUN"):
        out.setdefault("pipeline_run", os.environ["MLP_PIPELINE_RUN"])
    if "code_version" not in out:
        out["code_version"], dirty = _git_state()
        out.setdefault("code_dirty", dirty)
    out.setdefault("libraries", dict(library_versions()))
    return _jsonable(out)


def _git_state() -> tuple[str | None, bool | None]:
    """The commit checked out in the working directory and whether tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False)
        if head.returncode != 0:
            return None, None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=30, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    return head.stdout.strip() or None, (bool(status.stdout.strip()) if status.returncode == 0 else None)


@cache
def library_versions() -> dict[str, str | None]:
    """Installed versions of Python and the libraries a model depends on (None: not installed).
    Read from package metadata, so nothing is imported; read once per process (parsing the
    metadata costs ~50 ms), so an upgrade mid-process is not seen."""
    out: dict[str, str | None] = {"python": _pyplatform.python_version()}
    for lib in _LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = None
    return out


# ---------------------------------------------------------------------------- helpers
def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ModelError(f"bad model name {name!r}: use letters, digits, '_', '.' or '-', e.g. 'underwriting_pd'")
    return name


def _invert(aliases: Mapping[str, int]) -> dict[int, tuple[str, ...]]:
    out: dict[int, list[str]] = {}
    for alias, version in sorted(aliases.items()):
        out.setdefault(version, []).append(alias)
    return {v: tuple(a) for v, a in out.items()}


def _ranges(numbers: list[int]) -> str:
    return f"{numbers[0]}..{numbers[-1]}" if numbers == list(range(numbers[0], numbers[-1] + 1)) else str(numbers)


def _jsonable(value: Any) -> Any:
    """A JSON-safe copy: numpy scalars and arrays become Python values, datetimes ISO strings
    (naive ones taken as UTC), NaN/inf null, dataclasses and pydantic models dicts."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, PurePath | os.PathLike):
        return os.fspath(value)
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    if hasattr(value, "model_dump"):  # pydantic
        return _jsonable(value.model_dump(mode="json"))
    if hasattr(value, "tolist"):  # numpy scalars and arrays, torch tensors
        return _jsonable(value.tolist())
    return str(value)
