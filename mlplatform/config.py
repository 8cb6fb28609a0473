"""Platform configuration: pydantic models loaded from YAML, strict about every key.

    config = load_config("configs/local.yaml")
    config = load_config({"project": "bnpl", "storage": {"root": "s3://risk-ml/prod"}})

Every model forbids unknown keys; a bad value raises ``ConfigError`` naming the field and
echoing the value. ``${VAR}`` and ``${VAR:-default}`` in YAML strings are replaced from the
environment when the file is loaded, so a checked-in config can name an endpoint without
holding it. Credentials never live in a config: S3 uses the environment / standard AWS chain.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Discriminator, Field, PositiveInt, Tag, ValidationError, field_validator, model_validator

from mlplatform._duration import Duration
from mlplatform.errors import ConfigError
from mlplatform.decision_policy import DecisionPolicy
from mlplatform.served_models import ServedModelConfig, unique_models
from mlplatform.served_offers import ServingOffers

__all__ = [
    "ROLES",
    "FeaturesConfig",
    "ModelsConfig",
    "OnlineStoreConfig",
    "PlatformConfig",
    "PromotionGateConfig",
    "RayConfig",
    "RedisOnlineStoreConfig",
    "S3Options",
    "ServingConfig",
    "RedisStreamsConfig",
    "SqliteOnlineStoreConfig",
    "SqliteStreamsConfig",
    "StorageConfig",
    "StreamsConfig",
    "load_config",
    "load_yaml",
]

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_CREDENTIAL_KEYS = {
    "access_key",
    "access_key_id",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "key",
    "secret",
    "secret_access_key",
    "session_token",
    "token",
    "password",
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class S3Options(_Model):
    """How to reach S3 (or an S3-compatible server). Credentials come from the environment."""

    endpoint_url: str | None = Field(
        default=None,
        description="S3 endpoint, e.g. http://127.0.0.1:9000 for an S3-compatible server; None = AWS.",
    )
    region: str | None = Field(default=None, description="AWS region, e.g. eu-west-1.")

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            found = sorted(k for k in data if str(k).lower() in _CREDENTIAL_KEYS)
            if found:
                raise ValueError(
                    f"credentials do not belong in a config (found {found}); set AWS_ACCESS_KEY_ID/"
                    "AWS_SECRET_ACCESS_KEY in the environment or use an instance role / AWS profile"
                )
        return data

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"endpoint_url must be an http(s) URL such as http://127.0.0.1:9000, got {value!r}")
        return value.rstrip("/")


class StorageConfig(_Model):
    """Where everything persistent lives: one root, a local directory or ``s3://bucket/prefix``."""

    root: str = Field(default="./.mlplatform", description="Local path or s3://bucket/prefix.")
    s3: S3Options = Field(default_factory=S3Options, description="S3 connection options (no credentials).")

    @field_validator("root")
    @classmethod
    def _root(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("storage root must not be empty; use a local path or s3://bucket/prefix")
        if "://" not in value:
            if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/", value):
                raise ValueError(f"malformed URI {value!r}: write s3://bucket/prefix or a local path")
            return value
        scheme, _, rest = value.partition("://")
        if scheme == "file":
            if not rest.startswith("/"):
                raise ValueError(f"malformed URI {value!r}: file URIs need an absolute path (file:///abs/path)")
            return rest
        if scheme != "s3":
            raise ValueError(f"unsupported storage scheme {scheme!r} in {value!r}: use a local path or s3://bucket/prefix")
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ValueError(f"missing bucket in {value!r}: write s3://bucket/prefix")
        if not _BUCKET.match(bucket) or ".." in bucket:
            raise ValueError(
                f"invalid S3 bucket name {bucket!r} in {value!r}: 3-63 lowercase letters, digits, '.' or '-'"
            )
        if "//" in prefix:
            raise ValueError(f"malformed URI {value!r}: empty path segment in the prefix")
        return f"s3://{bucket}/{prefix.strip('/')}".rstrip("/")

    @property
    def is_s3(self) -> bool:
        return self.root.startswith("s3://")


class RayConfig(_Model):
    """How to reach Ray. With no address (and no RAY_ADDRESS set by a Ray job) a local Ray starts."""

    address: str | None = Field(
        default=None,
        description="None = local Ray (or the job's cluster); 'auto' = the running cluster; or host:port / ray://host:10001.",
    )
    num_cpus: PositiveInt | None = Field(default=None, description="CPUs for a local Ray; None = all of this machine's.")
    num_gpus: Annotated[int, Field(ge=0)] | None = Field(default=None, description="GPUs for a local Ray; None = detect.")
    object_store_memory_mb: PositiveInt | None = Field(default=None, description="Object store size for a local Ray.")
    dashboard_host: str = Field(default="127.0.0.1", description="Where a local Ray's dashboard listens.")
    namespace: str = Field(default="mlplatform", min_length=1, description="Ray namespace for named actors and Serve.")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value in (None, "", "local"):
            return None
        if value == "auto":
            return value
        if "://" in value:
            scheme = value.split("://", 1)[0]
            if scheme not in ("ray", "http", "https"):
                raise ValueError(f"Ray address must be 'auto', host:port or ray://host:port, got {value!r}")
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"Ray address must be 'auto', host:port or ray://host:port, got {value!r}")
        return value


class SqliteOnlineStoreConfig(_Model):
    """The embedded online store: one SQLite file, for a single machine."""

    type: Literal["sqlite"] = "sqlite"
    path: str | None = Field(default=None, description="SQLite file; None = <storage root>/online/online.db.")
    keep_generations: int = Field(
        default=2,
        ge=1,
        le=100,
        description="Published generations kept per view for rollback, the current one included (1: no rollback).",
    )


class RedisOnlineStoreConfig(_Model):
    """The production online store: Redis or Redis Cluster."""

    type: Literal["redis"]
    url: str = Field(description="redis://host:6379/0 or rediss://… (password from the REDIS_PASSWORD env var).")
    key_prefix: str = Field(default="mlp", min_length=1, description="Prefix of every key this project writes.")
    timeout: Duration = Field(default="50ms", description="Socket timeout for online reads.")
    keep_generations: int = Field(
        default=2,
        ge=1,
        le=100,
        description="Published generations kept per view for rollback, the current one included (1: no rollback).",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parsed = urlparse(value)
        if parsed.scheme not in ("redis", "rediss", "unix") or (parsed.scheme != "unix" and not parsed.hostname):
            raise ValueError(f"expected redis://host:port[/db] or rediss://…, got {value!r}")
        if parsed.password:
            raise ValueError("the Redis password does not belong in a config; set REDIS_PASSWORD in the environment")
        return value


OnlineStoreConfig = Annotated[
    SqliteOnlineStoreConfig | RedisOnlineStoreConfig,
    Field(discriminator="type"),
]


# read_ui: opens the web UI (mlplatform.ui) and nothing else; operate opens it too.
Role = Literal["decide", "predict", "read_features", "write_features", "operate", "read_ui"]
ROLES: tuple[str, ...] = ("decide", "predict", "read_features", "write_features", "operate", "read_ui")


def _redis_url(value: str) -> str:
    parsed = urlparse(value)
    if parsed.scheme not in ("redis", "rediss", "unix") or (parsed.scheme != "unix" and not parsed.hostname):
        raise ValueError(f"expected redis://host:port[/db] or rediss://…, got {value!r}")
    if parsed.password:
        raise ValueError("the Redis password does not belong in a config; set it in the environment (password_env)")
    return value


class _StreamsBase(_Model):
    """How the stream processors consume the event bus (shared by every bus type)."""

    processors: Annotated[int, Field(ge=1, le=256)] = Field(
        default=1, description="Stream processors (Ray actors, one consumer each) per stream source."
    )
    batch_size: Annotated[int, Field(ge=1, le=100_000)] = Field(default=500, description="Events a processor reads at a time.")
    block: Duration = Field(default="500ms", description="How long a read waits for new events before the loop turns.")
    flush_interval: Duration = Field(
        default="1s", description="How often a processor appends its applied events to the offline log and acknowledges them."
    )
    flush_events: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        default=5000, description="A processor flushes sooner once it holds this many applied, unlogged events."
    )
    claim_idle: Duration = Field(
        default="30s",
        description="Events pending this long for a consumer are taken over by another (the first is presumed dead).",
    )
    processor_cpus: Annotated[float, Field(ge=0, le=64)] = Field(
        default=0.5,
        description="CPUs Ray reserves for each processor actor (0: none, as for Serve's proxies; the actor still runs).",
    )

    @model_validator(mode="after")
    def _claim_after_flush(self) -> _StreamsBase:
        # a live processor holds events (pending) until its next flush: claiming sooner would
        # take them from it while it is still working
        if self.claim_idle < 2 * (self.flush_interval + self.block):
            raise ValueError(
                f"claim_idle ({self.claim_idle}) must be at least twice flush_interval + block "
                f"({2 * (self.flush_interval + self.block)}): a live processor holds events until it flushes"
            )
        return self


class SqliteStreamsConfig(_StreamsBase):
    """The embedded event bus: one SQLite file, for a single machine."""

    type: Literal["sqlite"] = "sqlite"
    path: str | None = Field(default=None, description="SQLite file; None = <storage root>/streams/events.db.")


class RedisStreamsConfig(_StreamsBase):
    """The production event bus: Redis Streams (see mlplatform.streams.redis for its guarantees)."""

    type: Literal["redis"]
    url: str = Field(description="redis://host:6379/0 or rediss://… (the password comes from password_env).")
    password_env: str = Field(default="REDIS_PASSWORD", min_length=1, description="Env var holding the Redis password.")
    key_prefix: str = Field(default="mlp", min_length=1, description="Prefix of every stream key this project writes.")
    timeout: Duration = Field(default="5s", description="Socket and connect timeout of every bus command.")
    durability: Literal["fsync_always", "as_configured"] = Field(
        default="fsync_always",
        description="fsync_always: an append succeeds only if Redis runs appendonly yes + appendfsync always "
        "(checked in each append's transaction); as_configured: whatever the server's persistence gives.",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _redis_url(value)

    @model_validator(mode="after")
    def _block_within_timeout(self) -> RedisStreamsConfig:
        if self.block > self.timeout - timedelta(milliseconds=500):
            raise ValueError(f"block ({self.block}) must be at least 500ms shorter than timeout ({self.timeout})")
        return self


def _streams_type(value: Any) -> Any:
    # ``type`` may be left out for the default bus (streams: {processors: 2})
    return value.get("type", "sqlite") if isinstance(value, Mapping) else getattr(value, "type", None)


StreamsConfig = Annotated[
    Annotated[SqliteStreamsConfig, Tag("sqlite")] | Annotated[RedisStreamsConfig, Tag("redis")],
    Discriminator(_streams_type, custom_error_type="invalid_bus", custom_error_message="type must be 'sqlite' or 'redis'"),
]


class FeaturesConfig(_Model):
    """Bounds on the feature data the platform accepts."""

    max_future_skew: Duration = Field(
        default="5m", description="Pushed or ingested event times may be at most this far after the server clock."
    )
    min_event_time: datetime = Field(
        default=datetime(2000, 1, 1, tzinfo=UTC), description="Pushed or ingested event times before this are refused (naive = UTC)."
    )

    @field_validator("min_event_time")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class ServingConfig(_Model):
    """The online decision service."""

    host: str = Field(default="127.0.0.1", description="Where Ray Serve's HTTP ingress listens.")
    port: Annotated[int, Field(ge=1, le=65535)] = Field(default=8000, description="HTTP port.")
    deadline: Duration = Field(
        default="50ms", description="The whole decision's budget (idempotency, features, scoring, answer) before falling back."
    )
    max_clock_skew: Duration = Field(
        default="5m", description="A decision request's timestamp may differ from the server clock by at most this."
    )
    api_key_env: str = Field(default="MLP_API_KEY", min_length=1, description="Env var that holds plain API keys (comma-separated).")
    api_key_roles: tuple[Role, ...] = Field(
        default=("decide", "predict", "read_features"),
        min_length=1,
        description="Roles of the keys in api_key_env: decide, predict, read_features, write_features, operate.",
    )
    api_key_digests_env: str = Field(
        default="MLP_API_KEY_DIGESTS",
        min_length=1,
        description="Env var with 'role+role:sha256hex' entries (comma or newline separated): keys given as digests, with their roles.",
    )
    api_key_digests_file: str | None = Field(
        default=None, description="A file with one 'role+role:sha256hex' entry per line ('#' comments), read where deploy runs."
    )
    fast_ingress: Literal["auto", "on", "off"] = Field(
        default="auto", description="HAProxy ingress + throughput mode: auto = on when haproxy is installed."
    )
    policy: DecisionPolicy = Field(
        default_factory=DecisionPolicy, description="Decision thresholds, limits and fallback (see mlplatform.decision_policy)."
    )
    models: tuple[ServedModelConfig, ...] = Field(
        default=(),
        description="Models served on the Open Inference Protocol and /v1/models routes (see mlplatform.served_models).",
    )
    offers: ServingOffers | None = Field(
        default=None,
        description="Credit-line offers for approved decisions: tiers, risk caps, the acting policy (see mlplatform.serving.offers).",
    )

    @field_validator("models")
    @classmethod
    def _unique_models(cls, value: tuple[ServedModelConfig, ...]) -> tuple[ServedModelConfig, ...]:
        return unique_models(value)


class PromotionGateConfig(_Model):
    """Bounds of the promotion gate (``models.promotion_gate``; ``mlplatform.models.gate``)."""

    auc_margin: float = Field(
        default=0.005, ge=0, le=1, description="How far the candidate's out-of-time AUC may fall below production's."
    )
    max_score_psi: float = Field(
        default=0.1, gt=0, description="Largest PSI of the candidate's scores against production's on the same rows."
    )
    max_calibration_error: float = Field(
        default=0.2, gt=0, description="Largest |mean score / observed default rate - 1| of the candidate."
    )
    split: str = Field(default="test", min_length=1, description="Training-set split the versions are compared on.")
    max_rows: PositiveInt = Field(default=50_000, description="Most recent rows of that split used at most.")
    min_rows: PositiveInt = Field(default=100, description="Fewer rows than this: the versions cannot be compared.")


class ModelsConfig(_Model):
    """The model registry: the promotion gate's bounds (see ``mlplatform.models.gate``)."""

    promotion_gate: PromotionGateConfig = Field(default_factory=PromotionGateConfig)


class PlatformConfig(_Model):
    """Everything a ``Platform`` needs; every section has an embedded default."""

    project: str = Field(
        default="bnpl",
        pattern=r"^[a-z][a-z0-9_-]{0,62}$",
        description="Project name: lowercase letters, digits, '_' or '-'.",
    )
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    online_store: OnlineStoreConfig = Field(default_factory=SqliteOnlineStoreConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    streams: StreamsConfig = Field(default_factory=SqliteStreamsConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, where: str) -> Any:
    if isinstance(value, str):

        def sub(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(f"{where}: environment variable {name} is not set (write ${{{name}:-default}} for a default)")

        return _ENV_REF.sub(sub, value)
    if isinstance(value, Mapping):
        return {k: _expand_env(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping with ``${VAR}`` expansion; a missing or malformed file is a ConfigError."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {str(path)!r}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return _expand_env(dict(data), "")


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem: ``field.path: message (got value)``."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(part) for part in err["loc"]) or "<top level>"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the config reference in README.md)"
        value = err.get("input")
        shown = repr(value)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        lines.append(f"{loc}: {msg} (got {shown})")
    return f"invalid config {source}: " + "; ".join(lines)


def load_config(source: str | os.PathLike[str] | Mapping[str, Any] | PlatformConfig | None = None) -> PlatformConfig:
    """Build a ``PlatformConfig`` from a YAML path, a mapping, an existing config or nothing (defaults).

    Raises:
        ConfigError: the file is missing or malformed, or any field is invalid; the message
            names every bad field and echoes its value.
    """
    if source is None:
        return PlatformConfig()
    if isinstance(source, PlatformConfig):
        return source
    if isinstance(source, Mapping):
        data, where = _expand_env(dict(source), ""), "mapping"
    elif isinstance(source, (str, os.PathLike)):
        data, where = load_yaml(source), repr(str(source))
    else:
        raise ConfigError(f"config must be a YAML path, a mapping or a PlatformConfig, got {type(source).__name__}")
    try:
        return PlatformConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where)) from None
