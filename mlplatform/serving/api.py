"""``platform.serving``: deploy, inspect and stop the online application; find and replay decisions.

    deployed = platform.serving.deploy("underwriting")     # needs MLP_API_KEY (serving.api_key_env)
    deployed.url                                            # http://127.0.0.1:8000
    platform.serving.status()
    platform.serving.decision("3f2a…")                      # the logged record
    platform.serving.replay("3f2a…")                        # recompute its score
    platform.serving.shutdown()

See ``mlplatform.serving`` for the cluster setup and ``mlplatform.serving.app`` for the routes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from mlplatform.errors import NotFoundError, PlatformError, ServingError
from mlplatform.decision_policy import DecisionPolicy

if TYPE_CHECKING:
    from mlplatform.config import PlatformConfig
    from mlplatform.served_models import ServedModelConfig
    from mlplatform.serving.ingress import IngressPlan
    from mlplatform.features.store import FeatureStore
    from mlplatform.models.registry import ModelRegistry
    from mlplatform.storage import Storage

__all__ = ["APP_NAME", "DeployedApp", "Serving", "ServingParts"]

log = logging.getLogger(__name__)

APP_NAME = "mlplatform"


@dataclass(frozen=True)
class DeployedApp:
    """A running serving application: where it answers and what it serves."""

    name: str
    url: str
    model_name: str
    model_version: int
    ingress: str
    num_replicas: int
    spool_dir: str
    stream_processors: int = 0


@dataclass(frozen=True)
class ServingParts:
    """What a serving replica works with, built in the replica from the deployed config."""

    config: PlatformConfig
    storage: Storage
    features: FeatureStore
    models: ModelRegistry
    #: Builds the web UI served at /ui from the replica's keys (None: no UI).
    ui: Callable[[Any], Any] | None = None


class Serving:
    """The online application on Ray Serve (``platform.serving``).

    Args:
        config: the platform config (serving settings, online store, storage root).
        storage: the storage root (decision log, registry).
        features: the feature store (definitions, online store).
        models: the model registry.
        connect_ray: connects this process to Ray (or starts a local Ray) before deploying.
        replica_parts: builds ``ServingParts`` from a config mapping, in each replica; a
            module-level function, so that it travels to replicas by reference.
    """

    def __init__(
        self,
        config: PlatformConfig,
        *,
        storage: Storage,
        features: FeatureStore,
        models: ModelRegistry,
        connect_ray: Callable[[], Any],
        replica_parts: Callable[[Mapping[str, Any]], ServingParts],
    ) -> None:
        self.config = config
        self.storage = storage
        self.features = features
        self.models = models
        self._connect_ray = connect_ray
        self._replica_parts = replica_parts
        self._deployed: DeployedApp | None = None
        self._policy: DecisionPolicy | None = None
        self._processors: Any = None  # StreamProcessors started by deploy

    def __repr__(self) -> str:
        return f"Serving(app={APP_NAME!r}, deployed={self._deployed!r})"

    # ------------------------------------------------------------------------- deploy
    def deploy(
        self,
        model_name: str = "underwriting",
        *,
        policy: DecisionPolicy | Mapping[str, Any] | None = None,
        blocking: bool = False,
        num_replicas: int = 2,
        replica_cpus: float = 1.0,
        feature_service: str = "underwriting_v1",
        spool_dir: str | os.PathLike[str] | None = None,
        ready_timeout_s: float = 300.0,
        batch_wait_ms: float = 0.0,
        stream_processors: bool = True,
    ) -> DeployedApp:
        """Start (or update in place) the serving application with ``model_name``'s ``production`` version.

            os.environ["MLP_API_KEY"] = "..."          # or the env var serving.api_key_env names
            deployed = platform.serving.deploy("underwriting", num_replicas=2)
            requests.post(f"{deployed.url}/v1/decisions", json=application, headers={"X-API-Key": key})

        Serve is configured for low latency: HAProxy ingress and throughput-optimized mode when
        an haproxy binary is available (``serving.fast_ingress``; see ``mlplatform.serving.ingress``),
        access logs off. Replicas then follow the model's aliases by themselves: moving
        ``production`` reaches them within about a second, without a restart.

        Args:
            model_name: the registered model; its ``production`` alias must be set.
            policy: the decision policy; default ``serving.policy`` from the config.
            blocking: serve until interrupted (Ctrl-C shuts the application down).
            num_replicas: replicas of the ingress deployment (each one does everything).
            replica_cpus: CPUs Ray reserves per replica.
            feature_service: the features of a model version whose lineage names none.
            spool_dir: the decision log spool on each node's local disk; default
                ``<storage root>/decisions/spool`` for a local root, ``./.mlplatform-spool/<project>``
                for an ``s3://`` root.
            ready_timeout_s: how long to wait for ``GET /health`` at the URL to answer.
            batch_wait_ms: how long a decision micro-batch waits for more requests after its
                first; 0 takes whatever queued while the previous batch ran (no added latency).
            stream_processors: also start the stream processors of every registered stream
                source (``streams.processors`` per source, detached: they run as long as the
                application), so events posted to ``/v1/events/{source}`` reach the online
                state; ``shutdown`` stops them.

        Returns:
            A ``DeployedApp`` with the ``url`` to call; it answers when this returns.

        Raises:
            ServingError: no API key is set (or one is shorter than 16 characters; see
                ``mlplatform.serving.keys`` for keys, their roles and digests), the model has
                no ``production`` version, that version does not fit the feature service, or
                the URL did not answer within ``ready_timeout_s``.
        """
        from mlplatform.serving.app import AppSettings
        from mlplatform.serving.ingress import plan_ingress
        from mlplatform.serving.keys import load_keys

        config = self.config
        keys = load_keys(config.serving)
        policy = _policy(policy if policy is not None else config.serving.policy)
        version = self._check_model(model_name, feature_service)
        if spool_dir is not None and not os.fspath(spool_dir):
            # abspath("") is the working directory: segments would land wherever this ran.
            raise ServingError("spool_dir is empty; give a directory on local disk, or None for the default")
        spool = os.path.abspath(os.fspath(spool_dir)) if spool_dir is not None else self.default_spool_dir()

        served = self._served_models(model_name, feature_service)
        unserved = [r.model for r in policy.model_rules if r.model not in {m.name for m in served}]
        if unserved:
            raise ServingError(f"the policy's model_rules name models {unserved} that serving.models does not list")
        plan = plan_ingress(config.serving.fast_ingress)
        ingress = self._start_serve(plan)
        settings = AppSettings(
            config=_portable_config(self.config, self.storage, self.features),
            parts=self._replica_parts,
            model_name=model_name,
            feature_service=feature_service,
            policy=policy.model_dump(mode="json"),
            keys=keys,
            max_clock_skew_s=config.serving.max_clock_skew.total_seconds(),
            spool_dir=spool,
            deadline_s=config.serving.deadline.total_seconds(),
            batch_wait_s=batch_wait_ms / 1000.0,
            models=tuple(m.model_dump(mode="json") for m in served),
        )
        self._run_app(settings, served, num_replicas=num_replicas, replica_cpus=replica_cpus)
        url = _url(config.serving.host, config.serving.port)
        _wait_until_answering(url, ready_timeout_s)
        processors = 0
        if stream_processors and self.features.list_stream_sources():
            self._processors = self.features.start_processors(detached=True)
            self._processors.ready()
            processors = len(self._processors.handles)
        self._deployed = DeployedApp(
            name=APP_NAME,
            url=url,
            model_name=model_name,
            model_version=version,
            ingress=ingress,
            num_replicas=num_replicas,
            spool_dir=spool,
            stream_processors=processors,
        )
        self._policy = policy
        log.info("serving %s v%s at %s (%s)", model_name, version, self._deployed.url, plan.note)
        if blocking:
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                self.shutdown()
        return self._deployed

    def _start_serve(self, plan: IngressPlan) -> str:
        """Connect to Ray and start Serve with ``plan``'s ingress (or join the Serve already
        running, whose ingress cannot change). Returns the ingress in use: ``haproxy``,
        ``proxy`` or ``existing``."""
        from ray import serve
        from ray.exceptions import ActorDiedError, GetTimeoutError

        from mlplatform.serving.ingress import prepare_process, serve_controller_running

        prepare_process(plan)
        self._connect_ray()
        ingress = plan.name
        if serve_controller_running():
            ingress = "existing"
            if plan.fast:
                log.warning(
                    "Ray Serve is already running in this cluster, so its ingress stays as it was started "
                    "(HAProxy or the default proxy). To get %s, run serve.shutdown() and deploy again.",
                    plan.note,
                )
        try:
            serve.start(
                http_options={"host": self.config.serving.host, "port": self.config.serving.port},
                logging_config={"enable_access_log": False},
                controller_options=plan.controller_options(),
            )
        except (GetTimeoutError, ActorDiedError) as exc:
            # serve.start gives the proxy 60 s and one life; on a starved machine it can take
            # longer, and the controller restarts it with growing timeouts. The URL check decides.
            log.warning("Serve's ingress is not ready yet (%s); deploying anyway and waiting for the URL", type(exc).__name__)
        return ingress

    def _run_app(self, settings: Any, served: tuple[ServedModelConfig, ...], *, num_replicas: int, replica_cpus: float) -> None:
        """Deploy (or update in place) the application with ``settings`` on ``num_replicas``
        replicas, and a deployment of its own for each served model that asks for one."""
        from ray import serve

        from mlplatform.serving.app import ServingApp
        from mlplatform.serving.model_server.deployment import ModelDeployment, ModelSettings, deployment_options

        handles = {
            m.name: ModelDeployment.options(**deployment_options(m)).bind(
                ModelSettings(
                    config=settings.config, parts=settings.parts, model=m.model_dump(mode="json"), alias_poll_s=settings.alias_poll_s
                )
            )
            for m in served
            if m.deployment is not None
        }
        application = ServingApp.options(
            num_replicas=num_replicas,
            ray_actor_options={"num_cpus": replica_cpus},
            logging_config={"enable_access_log": False},
        ).bind(settings, handles)
        try:
            serve.run(application, name=APP_NAME, route_prefix="/", blocking=False)
        except TimeoutError as exc:  # the app runs; the ingress is slow to report (see above)
            log.warning("%s; waiting for the URL", exc)
        except RuntimeError as exc:  # a replica could not start: its error is in the message
            raise ServingError(f"the serving application failed to deploy: {exc}") from None

    def _check_model(self, model_name: str, feature_service: str) -> int:
        """Load the production version here first, so a bad model fails the deploy, not a replica."""
        from mlplatform.serving.catalog import FeatureCatalog
        from mlplatform.serving.schemas import DecisionRequest
        from mlplatform.serving.scoring import load_scorer

        try:
            version = self.models.get(model_name, alias="production").version
            load_scorer(
                self.models,
                FeatureCatalog(self.features),
                model_name,
                version,
                feature_service,
                set(DecisionRequest.model_fields),
            )
        except PlatformError as exc:
            raise ServingError(f"cannot serve model {model_name!r}: {exc}") from None
        return version

    def _served_models(self, model_name: str, feature_service: str) -> tuple[ServedModelConfig, ...]:
        """``serving.models``, with the decision model added when not listed; each one's alias
        must point at a version that loads here (so a bad model fails the deploy, not a replica)."""
        from mlplatform.served_models import ServedModelConfig

        served = tuple(self.config.serving.models)
        if all(m.name != model_name for m in served):
            served = (ServedModelConfig(name=model_name, feature_service=feature_service), *served)
        for m in served:
            try:
                self.models.load_predictor(m.name, alias=m.alias)
            except PlatformError as exc:
                raise ServingError(f"cannot serve model {m.name!r} ({m.alias}): {exc}") from None
        return served

    # ------------------------------------------------------------------------ inspect
    def status(self) -> dict[str, Any]:
        """The application's state as Serve reports it: ``{"status", "url", "deployments":
        {name: {"status", "replicas": {state: count}, "message"}}}``; status ``NOT_DEPLOYED``
        when it is not running."""
        import ray

        if not ray.is_initialized():
            return {"status": "NOT_DEPLOYED", "url": None, "deployments": {}}
        from ray import serve

        try:
            app = serve.status().applications.get(APP_NAME)
        except Exception:  # no Serve instance in this cluster
            app = None
        if app is None:
            return {"status": "NOT_DEPLOYED", "url": None, "deployments": {}}
        return {
            "status": str(app.status.value if hasattr(app.status, "value") else app.status),
            "url": self._deployed.url if self._deployed else None,
            "message": app.message,
            "deployments": {
                name: {
                    "status": str(d.status.value if hasattr(d.status, "value") else d.status),
                    "replicas": {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()},
                    "message": d.message,
                }
                for name, d in app.deployments.items()
            },
        }

    def shutdown(self) -> None:
        """Delete the application (waits for its replicas to drain). Serve itself keeps running
        for other applications; ``ray.serve.shutdown()`` stops it."""
        import ray

        if not ray.is_initialized():
            return
        from ray import serve

        try:
            serve.delete(APP_NAME)
        except Exception as exc:  # Serve not running: nothing to delete
            log.debug("serve.delete(%r): %r", APP_NAME, exc)
        self.stop_stream_processors()
        self._deployed = None

    def stop_stream_processors(self) -> None:
        """Stop the stream processors ``deploy`` started, each after it logged and acknowledged
        what it applied (a processor killed instead loses nothing: its unacknowledged events
        are applied again when processors next run, but the offline log lags until then)."""
        if self._processors is not None:
            self._processors.stop()
            self._processors = None

    # ---------------------------------------------------------------------- decisions
    def default_spool_dir(self) -> str:
        """Where replicas spool the decision log unless ``deploy(spool_dir=...)`` says otherwise."""
        storage = self.storage
        if storage.is_s3:
            return os.path.abspath(os.path.join(".mlplatform-spool", self.config.project))
        return os.path.join(os.path.abspath(storage.root), "decisions", "spool")

    def spool_dir(self) -> str:
        return self._deployed.spool_dir if self._deployed else self.default_spool_dir()

    def decision(self, decision_id: str) -> dict[str, Any]:
        """The logged record of ``decision_id`` (this node's spool, then ``decisions/log``).

        Raises:
            NotFoundError: no such decision.
        """
        from mlplatform.serving.decisions.lookup import find_decision

        return find_decision(self.storage, decision_id, spool_dir=self.spool_dir())

    def decisions(self, since: datetime | None = None) -> list[dict[str, Any]]:
        """Every logged decision (since ``since``): the compacted log and this node's spool;
        see ``mlplatform.serving.decisions.lookup.read_decisions``."""
        from mlplatform.serving.decisions.lookup import read_decisions

        spool = self.spool_dir()
        return read_decisions(self.storage, spool_dir=spool if os.path.isdir(spool) else None, since=since)

    def compact_log(self) -> Any:
        """Compact this node's spool into ``decisions/log`` now (replicas also do it every
        minute): closed segments and those of dead replicas. Returns the ``CompactionResult``."""
        from mlplatform.serving.decisions.log import DecisionLog

        spool = self.spool_dir()
        if not os.path.isdir(spool):
            raise NotFoundError(f"no decision log spool at {spool!r}: nothing was served from this node")
        with DecisionLog(self.storage, spool_dir=spool, replica_id=f"compactor-{os.getpid()}") as decision_log:
            return decision_log.compact()

    def replay(self, decision_id: str, *, policy: DecisionPolicy | Mapping[str, Any] | None = None) -> Any:
        """Recompute a logged decision's score from its logged features with its logged model
        version (``mlplatform.serving.decisions.replay.replay``; this node's spool is searched too).

        A fallback decision is replayed with ``policy``, by default the policy this object
        deployed with (None when it deployed nothing: then the result says it is not replayable).
        """
        from mlplatform.serving.decisions.replay import replay

        chosen = _policy(policy) if policy is not None else self._policy
        return replay(self.models, self.storage, decision_id, spool_dir=self.spool_dir(), policy=chosen, offers=self.config.serving.offers)


def _policy(value: DecisionPolicy | Mapping[str, Any]) -> DecisionPolicy:
    if isinstance(value, DecisionPolicy):
        return value
    from pydantic import ValidationError

    from mlplatform.config import format_validation_error

    try:
        return DecisionPolicy.model_validate(dict(value))
    except ValidationError as exc:
        raise ServingError(format_validation_error(exc, "serving policy")) from None


def _portable_config(config: PlatformConfig, storage: Storage, features: FeatureStore) -> dict[str, Any]:
    """The config as JSON with local paths made absolute: replicas run in other directories."""
    data = config.model_dump(mode="json")
    if not storage.is_s3:
        data["storage"]["root"] = os.path.abspath(storage.root)
    online = data["online_store"]
    if online.get("type") == "sqlite":
        online["path"] = getattr(features.online_store, "path", online.get("path"))
    return data


def _wait_until_answering(url: str, timeout_s: float) -> None:
    """Poll ``GET {url}/health`` until it answers 200 (the ingress routes to a replica)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
                if response.status == 200:
                    return
                last = response.status
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.5)
    raise ServingError(f"the serving application did not answer at {url}/health within {timeout_s:.0f}s (last: {last!r})")


def _url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"
