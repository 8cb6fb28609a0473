"""The Ray Serve application: one FastAPI ingress deployment that serves features and decisions.

Routes (all JSON; every route but ``/health`` needs the ``X-API-Key`` header):

=============================  ===============================================================
``POST /v1/decisions``         decide a checkout application (``schemas.DecisionRequest``)
``POST /get-online-features``  Feast-compatible online feature lookup
``POST /push``                 Feast-compatible push of feature rows (online and/or offline)
``GET  /health``               liveness and the model version this replica serves (no key)
``GET  /v1/internal/replica``  this replica's process id, replica id and model (operators)
=============================  ===============================================================

Everything runs in the ingress replica's process: there is no second deployment to call, so
a decision costs no inter-replica hop (on two cores a hop costs more than the whole
decision). Work is grouped in micro-batches by ``@serve.batch`` without waiting (a batch is
whatever queued while the previous one ran): one online-store round trip per feature view,
one on-demand transform and one ``predict`` serve many requests under load, and a lone
request pays no batching delay. The batches run on the replica's event loop, not in a
thread pool: each thread hand-off costs a scheduler wake-up, which on a busy machine is
worth more than the work, and a blocked loop is bounded by the online store's timeout and
``serving.deadline``. Batching feature lookups assumes on-demand functions are row-wise (a
row's output depends only on that row), which training sets assume too: they run the same
function over batches of arbitrary composition.

The decision path per request:

1. the per-replica memory of recent answers, then (in the batch) the shared idempotency
   store: a retried ``application_id`` gets its stored answer;
2. features, score, policy, reasons in the batch; past ``serving.deadline`` (measured from
   the oldest request in the batch) the batch gets the fallback decision instead;
3. ``DecisionLog.append``: the record is fsynced to the replica's spool (group commit; the
   only hand-off to another thread);
4. the answer is stored put-if-absent in the idempotency store (a concurrent copy of the same
   request that stored first wins, and this one answers with that);
5. the response.

A decision that cannot be logged is not answered (503): a returned decision is always in the
log, even if the replica is SIGKILLed right after.
"""

import asyncio
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve

from mlplatform.errors import DataError, DefinitionError, NotFoundError, PlatformError
from mlplatform.online.base import OnlineStoreUnavailable
from mlplatform.serving.guard import Guard
from mlplatform.serving.schemas import DecisionRequest, FeatureRequest, PushRequest

__all__ = ["AppSettings", "ServingApp", "ServingReplica", "app"]

log = logging.getLogger(__name__)

_RECENT = 10_000  # answers remembered per replica for retries while the shared store is down


@dataclass(frozen=True)
class AppSettings:
    """What a replica needs, as plain data (it travels to every replica)."""

    config: dict[str, Any]
    model_name: str
    feature_service: str
    policy: dict[str, Any]
    key_digests: tuple[str, ...]
    spool_dir: str
    deadline_s: float
    alias_poll_s: float = 1.0
    compact_every_s: float = 60.0
    batch_wait_s: float = 0.0
    # No extra wait for company before an fsync: records that arrive while one runs share the
    # next, so batches form under load anyway, and a lone decision is not held back.
    group_commit_ms: float = 0.0


# ----------------------------------------------------------------------------- the app
app = FastAPI(title="mlplatform serving", docs_url=None, redoc_url=None, openapi_url=None)
app.add_middleware(Guard)


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = []
    for err in exc.errors():
        loc = list(err.get("loc", ()))
        loc = ".".join(str(p) for p in (loc[1:] if loc[:1] == ["body"] else loc)) or "body"
        shown = repr(err.get("input"))
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        problems.append({"field": loc, "message": msg, "type": err.get("type")})
        if err.get("type") not in ("missing", "json_invalid"):
            problems[-1]["message"] = f"{msg} (got {shown})"
    summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
    return JSONResponse({"error": "invalid_request", "message": summary, "problems": problems}, status_code=422)


def _error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": kind, "message": message}, status_code=status)


def _platform_error(exc: Exception) -> JSONResponse:
    """The HTTP answer to a ``PlatformError``; anything else is a bug and is raised (a 500)."""
    if isinstance(exc, OnlineStoreUnavailable):
        return _error(503, "feature_store_unavailable", str(exc))
    if isinstance(exc, (DataError, DefinitionError, NotFoundError)):
        return _error(422, "invalid_request", str(exc))
    raise exc


class ServingReplica:
    """One replica of the serving application (see the module docstring); deployed as
    ``ServingApp``. The class keeps its own module-level name so that it travels to replicas
    by reference (imported there with all of this module) rather than pickled by value with
    only the globals its methods name."""

    def __init__(self, settings: AppSettings) -> None:
        from mlplatform.platform import Platform
        from mlplatform.serving.catalog import FeatureCatalog
        from mlplatform.serving.decision_log import DecisionLog
        from mlplatform.serving.engine import DecisionEngine
        from mlplatform.serving.idempotency import open_idempotency_store
        from mlplatform.serving.metrics import ServingMetrics
        from mlplatform.serving.policy import DecisionPolicy
        from mlplatform.serving.scoring import ModelWatcher

        Guard.configure(settings.key_digests)
        self.settings = settings
        self.platform = Platform.from_config(settings.config)
        self.catalog = FeatureCatalog(self.platform.features)
        policy = DecisionPolicy.model_validate(settings.policy)
        aliases = ("production", policy.shadow_alias) if policy.shadow_alias else ("production",)
        self.watcher = ModelWatcher(
            self.platform,
            self.catalog,
            settings.model_name,
            aliases=aliases,
            default_service=settings.feature_service,
            available_inputs=set(DecisionRequest.model_fields),
            poll_s=settings.alias_poll_s,
        )
        self.watcher.poll()  # serve the current version from the first request
        self.watcher.start()
        self.idempotency = open_idempotency_store(self.platform.config, self.catalog.online_store)
        self.engine = DecisionEngine(watcher=self.watcher, catalog=self.catalog, policy=policy, idempotency=self.idempotency)
        context = serve.get_replica_context()
        self.replica_id = re.sub(r"[^A-Za-z0-9_.+=-]", "-", f"{context.deployment}-{context.replica_id.unique_id}")[:100]
        self.log = DecisionLog(
            self.platform.storage,
            spool_dir=settings.spool_dir,
            replica_id=self.replica_id,
            group_commit_ms=settings.group_commit_ms,
        )
        self.metrics = ServingMetrics(settings.model_name)
        self.recent: OrderedDict[str, str] = OrderedDict()
        self.batches = {"decide": [0, 0], "features": [0, 0]}  # batches, requests: for operators
        self.phases = [0, 0.0, 0.0, 0.0]  # decisions; seconds deciding, logging, storing the answer
        if settings.batch_wait_s > 0:
            self._decide_batch.set_batch_wait_timeout_s(settings.batch_wait_s)
        self._stop = threading.Event()
        self._housekeeping = threading.Thread(target=self._housekeep, name="serving-housekeeping", daemon=True)
        self._housekeeping.start()
        log.info("replica %s (pid %d) ready; model %s", self.replica_id, os.getpid(), self._model_ref())

    # ------------------------------------------------------------------------ routes
    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        model = self._model_ref()
        return {"status": "ok" if model else "degraded", "model": model, "replica": self.replica_id}

    @app.get("/v1/internal/replica")
    async def replica(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "replica_id": self.replica_id,
            "model": self._model_ref(),
            "spool_dir": self.settings.spool_dir,
            "failed_versions": self.watcher.failed(),
            "batches": {k: {"batches": b, "requests": r} for k, (b, r) in self.batches.items()},
            "decision_phases_ms": {
                name: round(total / max(1, self.phases[0]) * 1000, 3)
                for name, total in zip(("decide", "log", "store_answer"), self.phases[1:])
            },
        }

    @app.post("/get-online-features")
    async def get_online_features(self, body: FeatureRequest) -> Response:
        started = time.perf_counter()
        result = await self._features_batch(body)
        if isinstance(result, Exception):
            return _platform_error(result)
        self.metrics.feature_server_seconds.observe(time.perf_counter() - started)
        return Response(result, media_type="application/json")

    @app.post("/push")
    async def push(self, body: PushRequest) -> Response:
        def run() -> int:
            frame = _push_frame(self.catalog, body.view(), body.df)
            return self.platform.features.push(body.view(), frame, to=body.to)

        try:
            rows = await asyncio.get_running_loop().run_in_executor(None, run)
        except PlatformError as exc:
            return _platform_error(exc)
        return JSONResponse({"pushed": rows, "feature_view": body.view(), "to": body.to})

    @app.post("/v1/decisions")
    async def decide(self, body: DecisionRequest) -> Response:
        from mlplatform.serving.engine import Job, answer_for

        job = Job(body, time.perf_counter())
        known = self.recent.get(body.application_id)
        if known is not None:
            return self._replayed(known, job)
        outcome = await self._decide_batch(job)
        if outcome.stored is not None:
            return self._replayed(outcome.stored, job)
        decided = time.perf_counter()
        try:
            await self.log.append(outcome.record)
        except Exception as exc:  # not durable: the decision must not be given
            log.error("decision %s not logged: %r", outcome.record["decision_id"], exc)
            self.metrics.log_failures.inc()
            return _error(503, "decision_log_unavailable", "the decision could not be recorded; retry the same request")
        logged = time.perf_counter()
        winner = await self._commit_batch((body.application_id, outcome.answer))
        phases = self.phases
        phases[0] += 1
        phases[1] += decided - job.started
        phases[2] += logged - decided
        phases[3] += time.perf_counter() - logged
        if winner is not None:  # a copy of this request stored its answer first: give that one
            status, content = answer_for(winner, job.fingerprint)
            self.metrics.replays.inc()
            return Response(content, status_code=status, media_type="application/json")
        self._remember(body.application_id, outcome.answer)
        self.metrics.decided(outcome.decision, outcome.fallback_reason, time.perf_counter() - job.started)
        return Response(outcome.body, media_type="application/json")

    # ------------------------------------------------------------------ micro-batches
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _decide_batch(self, jobs: list[Any]) -> list[Any]:
        self.batches["decide"][0] += 1
        self.batches["decide"][1] += len(jobs)
        deadline_at = min(j.started for j in jobs) + self.settings.deadline_s
        try:
            outcomes, timings = self.engine.decide(jobs, deadline_at=deadline_at)
        except Exception:  # a bug must still answer, with the fallback
            log.exception("deciding a batch of %d failed", len(jobs))
            return self.engine.fallback(jobs, "internal_error", scorer=self.watcher.current("production"))
        if timings.lookup_s is not None:
            self.metrics.lookup_seconds.observe(timings.lookup_s)
        if timings.scoring_s is not None:
            self.metrics.scoring_seconds.observe(timings.scoring_s)
        return outcomes

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _commit_batch(self, entries: list[tuple[str, str]]) -> list[str | None]:
        from mlplatform.serving.idempotency import IdempotencyUnavailable

        try:
            return self.idempotency.put_if_absent_many(entries)
        except IdempotencyUnavailable as exc:
            # Answer anyway: the decision is logged; retries to this replica still hit ``recent``.
            log.warning("idempotency store not written for %d decisions: %s", len(entries), exc)
            return [None] * len(entries)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _features_batch(self, bodies: list[FeatureRequest]) -> list[bytes | Exception]:
        self.batches["features"][0] += 1
        self.batches["features"][1] += len(bodies)
        return lookup_many(self.catalog, bodies)

    # ------------------------------------------------------------------------ helpers
    def _replayed(self, stored: str, job: Any) -> Response:
        from mlplatform.serving.engine import answer_for

        status, content = answer_for(stored, job.fingerprint)
        self.metrics.replays.inc()
        return Response(content, status_code=status, media_type="application/json")

    def _remember(self, application_id: str, answer: str) -> None:
        self.recent[application_id] = answer
        if len(self.recent) > _RECENT:
            self.recent.popitem(last=False)

    def _model_ref(self) -> dict[str, Any] | None:
        scorer = self.watcher.current("production")
        return {"name": scorer.name, "version": scorer.version} if scorer else None

    def _housekeep(self) -> None:
        """Refresh cached definitions now and then, and compact the spool every so often."""
        last_compact = time.monotonic()
        while not self._stop.wait(5.0):
            try:
                self.catalog.refresh()
            except Exception:
                log.exception("refreshing feature definitions failed")
            if time.monotonic() - last_compact >= self.settings.compact_every_s:
                last_compact = time.monotonic()
                try:
                    self.log.compact()
                except Exception:
                    log.exception("compacting the decision log spool failed (the next run retries)")

    def __del__(self) -> None:
        # Serve calls this on graceful shutdown; parts may be missing if __init__ failed.
        if hasattr(self, "_stop"):
            self._stop.set()
        if hasattr(self, "watcher"):
            self.watcher.stop()
        if hasattr(self, "log"):
            self.log.close()  # rolls the open segment so any compactor may take it


ServingApp = serve.deployment(name="mlplatform", max_ongoing_requests=64, graceful_shutdown_timeout_s=10)(
    serve.ingress(app)(ServingReplica)
)


def lookup_many(catalog: Any, bodies: list[FeatureRequest]) -> list[bytes | Exception]:
    """Answer several ``/get-online-features`` bodies: those asking for the same features with
    the same entity columns in one ``get_online_features`` call (rows concatenated, results
    split back), the rest one by one. A merged call that fails is retried body by body, so each
    body gets its own answer or error. Returns JSON bytes or the ``PlatformError`` per body."""
    from mlplatform.online.lookup import get_online_features

    out: list[bytes | Exception | None] = [None] * len(bodies)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, body in enumerate(bodies):
        target = body.target()
        lengths = {len(v) for v in body.entities.values()}
        key = (target if isinstance(target, str) else tuple(target), body.full_feature_names, tuple(body.entities))
        groups.setdefault(key if len(lengths) == 1 else ("single", i), []).append(i)

    def one(i: int) -> bytes | Exception:
        body = bodies[i]
        try:
            response = get_online_features(catalog, body.target(), body.entities, full_feature_names=body.full_feature_names)
        except Exception as exc:  # this body's answer: a PlatformError is a 4xx/503, anything else a 500
            return exc
        return _encode_response(response.to_json_dict())

    for key, members in groups.items():
        if len(members) > 1:
            first = bodies[members[0]]
            entities = {k: [v for i in members for v in bodies[i].entities[k]] for k in first.entities}
            try:
                response = get_online_features(catalog, first.target(), entities, full_feature_names=first.full_feature_names)
            except Exception:
                response = None  # someone's rows are bad: find out whose, one by one
            if response is not None:
                doc = response.to_json_dict()
                start = 0
                for i in members:
                    n = len(next(iter(bodies[i].entities.values())))
                    part = {
                        "metadata": doc["metadata"],
                        "results": [{k: r[k][start : start + n] for k in ("values", "statuses", "event_timestamps")} for r in doc["results"]],
                    }
                    out[i] = _encode_response(part)
                    start += n
                continue
        for i in members:
            out[i] = one(i)
    return out  # type: ignore[return-value]


def _encode_response(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _push_frame(catalog: Any, view_name: str, df: dict[str, list[Any]]) -> Any:
    """The pushed columns as a DataFrame, timestamps parsed from ISO 8601 text."""
    import pandas as pd

    lengths = {c: len(v) for c, v in df.items()}
    if len(set(lengths.values())) != 1:
        raise DataError(f"push: every df column must have one length, got {lengths}")
    view = catalog.resolve_view(view_name)
    stamps = {"event_timestamp"} | {f.name for f in getattr(view, "features", ()) if f.dtype == "timestamp"}
    frame = pd.DataFrame(df)
    for column in stamps & set(frame.columns):
        try:
            frame[column] = pd.to_datetime(frame[column], utc=True, format="ISO8601")
        except (ValueError, TypeError) as exc:
            raise DataError(f"push: column {column!r} must hold ISO 8601 timestamps: {exc}") from None
    return frame
