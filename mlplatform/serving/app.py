"""The Ray Serve application: one FastAPI ingress deployment that serves features, models and decisions.

Routes (all JSON; every route but ``/health`` and the V2 health routes needs an ``X-API-Key``
holding the route's role, see ``mlplatform.serving.guard``):

=============================  ==============  ================================================
``POST /v1/decisions``         decide          decide a checkout application (``schemas.DecisionRequest``)
``POST /get-online-features``  read_features   Feast-compatible online feature lookup
``POST /push``                 write_features  Feast-compatible push of feature rows (online and/or offline)
``POST /v1/events/{source}``   write_features  a batch of events onto the event bus (real-time features)
``GET  /health``               (none)          liveness and the model version this replica serves
``GET  /v1/internal/replica``  operate         this replica's process id, replica id and model
``GET  /openapi.json``         any key         the OpenAPI document of every route
``/v2/…``, ``/v1/models/…``    predict         every served model: the Open Inference Protocol (V2)
                                               and feature-aware predict (``model_server.routes``)
=============================  ==============  ================================================

Errors are JSON (see ``mlplatform.serving.http``, which holds the FastAPI app and its error
handlers; merged feature lookups and push frames are in ``mlplatform.serving.feature_batches``):
401/403 for a missing key or role, 413 for a body too large, 422 naming each bad field (and,
for an on-demand feature, the request field its function failed on), 409 for a conflicting or
still-running copy of a decision, 503 when a store or the decision log is unavailable.

Everything runs in the ingress replica's process: there is no second deployment to call, so
a decision costs no inter-replica hop (on two cores a hop costs more than the whole
decision). Work is grouped in micro-batches by ``@serve.batch`` without waiting (a batch is
whatever queued while the previous one ran): one idempotency round trip, one online-store
round trip per feature view, one on-demand transform and one ``predict`` serve many requests
under load, and a lone request pays no batching delay. Batching feature lookups assumes
on-demand functions are row-wise (a row's output depends only on that row), which training
sets assume too: they run the same function over batches of arbitrary composition.

The decision path per request, all within one budget, ``serving.deadline``, counted from the
request's arrival (steps 3 and 4 run on a small thread pool so that a hung store cannot hold
them past it):

1. a retry is answered from the replica's memory of recent answers or the node's
   unconfirmed answers; a copy of a request this replica is deciding waits for that answer;
2. a ``timestamp`` farther than ``serving.max_clock_skew`` from the server clock is refused
   (422), unless the application was decided before (then that answer);
3. the application id is reserved in the shared idempotency store (``idempotency``): an
   answer found there is returned; a copy being decided by another replica is waited for
   (up to the deadline plus ``WAIT_MARGIN_S``; then 409 ``decision_in_progress``, retry);
   if the store does not answer within half the deadline the decision goes on unconfirmed,
   and when that store also holds the features (Redis), it is the fallback decision at once;
4. features, score, policy, reasons in the batch; past the deadline the batch gets the
   fallback decision instead;
5. ``DecisionLog.append``: the record is fsynced to the replica's spool (group commit), with
   ``returned: true`` and ``confirmed`` saying whether step 3 reserved it;
6. the answer replaces the reservation in the idempotency store; if the store cannot take it
   in time (or step 3 failed), the answer is kept durably in the node's spool
   (``UnconfirmedAnswers``) and written to the store by the replicas' housekeeping as soon as
   it answers; if another copy's answer got there first (only after a reservation lapsed),
   that answer is given and this decision is logged again with ``returned: false``;
7. the response.

A decision that cannot be logged is not answered (503): a returned decision is always in the
log, even if the replica is SIGKILLed right after.
"""

import asyncio
import logging
import os
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from fastapi import Path
from fastapi.responses import JSONResponse, Response
from ray import serve

from mlplatform.errors import NotFoundError, PlatformError
from mlplatform.serving.feature_batches import lookup_many, push_frame
from mlplatform.serving.fast_routes import FastRoutes
from mlplatform.serving.guard import Guard
from mlplatform.serving.ui_mount import UiMount
from mlplatform.serving.http import ERROR_RESPONSES, app, error_response, platform_error_response
from mlplatform.serving.idempotency import IdempotencyUnavailable, is_pending, pending_marker
from mlplatform.serving.model_server.routes import ModelRoutes
from mlplatform.serving.schemas import (
    DecisionRequest,
    DecisionResponse,
    ErrorResponse,
    EventsRequest,
    EventsResponse,
    FeatureRequest,
    FeatureResponse,
    HealthResponse,
    PushRequest,
    PushResponse,
)
from mlplatform.streams.base import EventBusUnavailable

__all__ = ["FRESH_S", "WAIT_MARGIN_S", "AppSettings", "ServingApp", "ServingReplica", "app"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_RECENT = 10_000  # answers remembered per replica for retries while the shared store is down
#: How much longer than its own deadline a copy waits for another replica's answer.
WAIT_MARGIN_S = 1.0
#: With the idempotency store unreachable, a request whose timestamp is older than this (and
#: that this node has no answer for) may be a retry, and is refused rather than decided anew.
FRESH_S = 10.0
_COMMIT_FLOOR_S = 0.005  # the answer's store write gets at least this, even past the deadline
_IO_THREADS = 4  # store calls in flight per replica; a hung store can block at most these


@dataclass(frozen=True)
class AppSettings:
    """What a replica needs, as plain data (it travels to every replica); ``parts`` builds the
    replica's storage, feature store and model registry from ``config`` (a module-level
    function: it travels by reference)."""

    config: dict[str, Any]
    parts: Callable[[dict[str, Any]], Any]
    model_name: str
    feature_service: str
    policy: dict[str, Any]
    keys: tuple[tuple[str, tuple[str, ...]], ...]
    spool_dir: str
    deadline_s: float
    max_clock_skew_s: float = 300.0
    alias_poll_s: float = 1.0
    compact_every_s: float = 60.0
    batch_wait_s: float = 0.0
    # No extra wait for company before an fsync: records that arrive while one runs share the
    # next, so batches form under load anyway, and a lone decision is not held back.
    group_commit_ms: float = 0.0
    #: The ``serving.models`` entries served (as JSON), the decision model among them.
    models: tuple[dict[str, Any], ...] = ()


class ServingReplica(ModelRoutes):
    """One replica of the serving application (see the module docstring); deployed as
    ``ServingApp``. The class keeps its own module-level name so that it travels to replicas
    by reference (imported there with all of this module) rather than pickled by value with
    only the globals its methods name."""

    def __init__(self, settings: AppSettings, model_handles: dict[str, Any] | None = None) -> None:
        from mlplatform.served_models import ServedModelConfig
        from mlplatform.serving.catalog import FeatureCatalog
        from mlplatform.serving.model_server.served import ModelServer
        from mlplatform.serving.decisions.log import DecisionLog
        from mlplatform.serving.decisions.unconfirmed import UnconfirmedAnswers
        from mlplatform.serving.engine import DecisionEngine
        from mlplatform.serving.idempotency import open_idempotency_store
        from mlplatform.monitoring.latest import latest_psi
        from mlplatform.serving.metrics import ServingMetrics
        from mlplatform.decision_policy import DecisionPolicy
        from mlplatform.serving.scoring import ModelWatcher, scorer_loader

        Guard.configure(settings.keys)
        self.settings = settings
        self.parts = settings.parts(settings.config)
        UiMount.configure((lambda: self.parts.ui(settings.keys)) if self.parts.ui else None)
        self.catalog = FeatureCatalog(self.parts.features)
        policy = DecisionPolicy.model_validate(settings.policy)
        aliases = ("production", policy.shadow_alias) if policy.shadow_alias else ("production",)
        load = scorer_loader(
            self.parts.models, self.catalog, settings.model_name, settings.feature_service, set(DecisionRequest.model_fields)
        )
        self.watcher = ModelWatcher(self.parts.models, settings.model_name, load=load, aliases=aliases, poll_s=settings.alias_poll_s)
        self.watcher.poll()  # serve the current version from the first request
        self.watcher.start()
        self.idempotency = open_idempotency_store(self.parts.config, self.catalog.online_store)
        # With the Redis online store, idempotency keys and features share one server.
        self._store_shared = self.parts.config.online_store.type == "redis"
        served = [ServedModelConfig.model_validate(m) for m in settings.models]
        self.model_server = ModelServer.build(
            served,
            models=self.parts.models,
            catalog=self.catalog,
            handles=model_handles or {},
            default_services={settings.model_name: settings.feature_service},
            poll_s=settings.alias_poll_s,
        )
        deadlines = {m.name: (m.deadline.total_seconds() if m.deadline else settings.deadline_s) for m in served}
        self.metrics = ServingMetrics(settings.model_name, psi_reader=lambda: latest_psi(self.parts.storage, settings.model_name))
        self.engine = DecisionEngine(
            observer=self.metrics.served.add,
            watcher=self.watcher,
            catalog=self.catalog,
            policy=policy,
            rule_models={r.model: self.model_server.scorer(r.model) for r in policy.model_rules},
            rule_deadlines_s=deadlines,
            offers=self._offers(),
        )
        context = serve.get_replica_context()
        self.replica_id = re.sub(r"[^A-Za-z0-9_.+=-]", "-", f"{context.deployment}-{context.replica_id.unique_id}")[:100]
        self.log = DecisionLog(
            self.parts.storage,
            spool_dir=settings.spool_dir,
            replica_id=self.replica_id,
            group_commit_ms=settings.group_commit_ms,
        )
        self.unconfirmed = UnconfirmedAnswers(os.path.join(settings.spool_dir, "unconfirmed"))
        self.recent: OrderedDict[str, str] = OrderedDict()
        self.inflight: dict[str, asyncio.Future[str | None]] = {}
        self.batches = {"decide": [0, 0], "features": [0, 0]}  # batches, requests: for operators
        self.phases = [0, 0.0, 0.0, 0.0]  # decisions; seconds deciding, logging, storing the answer
        self._io = ThreadPoolExecutor(max_workers=_IO_THREADS, thread_name_prefix="serving-io")
        self._disk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="serving-unconfirmed")
        if settings.batch_wait_s > 0:
            self._decide_batch.set_batch_wait_timeout_s(settings.batch_wait_s)
        self._stop = threading.Event()
        self._housekeeping = threading.Thread(target=self._housekeep, name="serving-housekeeping", daemon=True)
        self._housekeeping.start()
        self._syncing = threading.Thread(target=self._sync_unconfirmed, name="serving-unconfirmed", daemon=True)
        self._syncing.start()
        # valid decisions and lookups skip FastAPI's routing (mlplatform.serving.fast_routes)
        FastRoutes.serve({"/v1/decisions": (DecisionRequest, self.decide), "/get-online-features": (FeatureRequest, self.get_online_features)})
        log.info("replica %s (pid %d) ready; model %s", self.replica_id, os.getpid(), self._model_ref())

    def _offers(self) -> Any:
        """The offers of approved decisions (serving.offers), the policy model followed like the decision model."""
        from mlplatform.serving.offers import DecisionOffers, load_policy
        from mlplatform.serving.scoring import ModelWatcher

        config = self.parts.config.serving.offers
        if config is None:
            return None
        self.offer_watcher = None
        if config.policy_model is not None:
            tiers = config.offer_config()
            self.offer_watcher = ModelWatcher(
                self.parts.models, config.policy_model, aliases=(config.alias, *((config.shadow_alias,) if config.shadow_alias else ())),
                load=lambda version: load_policy(self.parts.models, config.policy_model, version, tiers), poll_s=self.settings.alias_poll_s,
            )
            self.offer_watcher.poll()
            self.offer_watcher.start()
        return DecisionOffers(config, self.offer_watcher)

    # ------------------------------------------------------------------------ routes
    @app.get("/health", response_model=HealthResponse)
    async def health(self) -> dict[str, Any]:
        """Liveness and the model version this replica serves (no key needed)."""
        model = self._model_ref()
        return {"status": "ok" if model else "degraded", "model": model, "replica": self.replica_id}

    @app.get("/v1/internal/replica", responses=ERROR_RESPONSES)
    async def replica(self) -> dict[str, Any]:
        """This replica's process, model, batching and phase timings (role ``operate``)."""
        return {
            "pid": os.getpid(),
            "replica_id": self.replica_id,
            "model": self._model_ref(),
            "spool_dir": self.settings.spool_dir,
            "failed_versions": self.watcher.failed(),
            "batches": {k: {"batches": b, "requests": r} for k, (b, r) in self.batches.items()},
            "model_batches": {k: {"batches": b, "requests": r} for k, (b, r) in ((n, m.batches) for n, m in self.model_server.batchers.items())},
            "decision_phases_ms": {
                name: round(total / max(1, self.phases[0]) * 1000, 3)
                for name, total in zip(("decide", "log", "store_answer"), self.phases[1:])
            },
        }

    @app.post("/get-online-features", response_model=FeatureResponse, responses=ERROR_RESPONSES)
    async def get_online_features(self, body: FeatureRequest) -> Response:
        """Feast's online lookup: the current values of ``features`` (or a ``feature_service``)
        for column-wise ``entities`` (role ``read_features``)."""
        started = time.perf_counter()
        result = await self._features_batch(body)
        if isinstance(result, Exception):
            return platform_error_response(result)
        self.metrics.feature_server_seconds.observe(time.perf_counter() - started)
        return Response(result, media_type="application/json")

    @app.post("/push", response_model=PushResponse, responses=ERROR_RESPONSES)
    async def push(self, body: PushRequest) -> Response:
        """Feast's push: rows of one feature view to the online store, the offline store or both
        (role ``write_features``). Event times must lie between ``features.min_event_time`` and
        the server clock plus ``features.max_future_skew``; nothing of a refused push is written."""

        def run() -> int:
            frame = push_frame(self.catalog, body.view(), body.df)
            return self.parts.features.push(body.view(), frame, to=body.to)

        try:
            rows = await asyncio.get_running_loop().run_in_executor(None, run)
        except PlatformError as exc:
            return platform_error_response(exc)
        return JSONResponse({"pushed": rows, "feature_view": body.view(), "to": body.to})

    @app.post(
        "/v1/events/{source}",
        response_model=EventsResponse,
        responses={**ERROR_RESPONSES, 404: {"model": ErrorResponse, "description": "No stream source of this name is registered."}},
    )
    async def ingest_events(self, source: Annotated[str, Path(max_length=100)], body: EventsRequest) -> Response:
        """Append a batch of events of stream source ``source`` to the event bus (role
        ``write_features``). Every event is checked against the source's definition first; a
        bad one is a 422 naming its row and field, and nothing of the batch is appended. A 200
        means every event is durable on the bus; processors apply it online within a second."""
        try:
            result = await asyncio.get_running_loop().run_in_executor(None, lambda: self.parts.features.ingest(source, body.events))
        except NotFoundError as exc:
            return error_response(404, "unknown_source", str(exc))
        except EventBusUnavailable as exc:
            error_id = uuid.uuid4().hex[:16]
            log.warning("event bus unavailable %s: %s", error_id, exc)
            return error_response(503, "event_bus_unavailable", f"the event bus did not confirm the events; send the same batch again (error {error_id})", error_id=error_id)
        except PlatformError as exc:
            return platform_error_response(exc)
        return JSONResponse(
            {
                "source": result.source,
                "accepted": result.count,
                "first_position": result.first_position,
                "last_position": result.last_position,
                "first_known_at": result.first_known_at.isoformat(),
                "last_known_at": result.last_known_at.isoformat(),
            }
        )

    @app.post(
        "/v1/decisions",
        response_model=DecisionResponse,
        responses={**ERROR_RESPONSES, 409: {"model": ErrorResponse, "description": "The application_id was decided for a different request, or a copy is still being decided."}},
    )
    async def decide(self, body: DecisionRequest) -> Response:
        """Decide a checkout application (role ``decide``); a retry with the same
        ``application_id`` gets the same answer (see the module docstring for the guarantee)."""
        from mlplatform.serving.engine import Job

        job = Job(body, time.perf_counter())
        application_id = body.application_id
        known = self.recent.get(application_id)
        if known is None and self.unconfirmed.any():
            known = self.unconfirmed.get(application_id)
        if known is not None:
            return self._replayed(known, job)
        running = self.inflight.get(application_id)
        if running is not None:  # a copy is being decided in this replica: its answer is ours
            answer = await asyncio.shield(running)
            if answer is None:
                return error_response(503, "decision_unavailable", "an identical request being decided failed; retry the same request")
            return self._replayed(answer, job)
        skew = (body.timestamp - datetime.now(UTC)).total_seconds()
        if abs(skew) > self.settings.max_clock_skew_s:
            return await self._off_clock(job, skew)
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.inflight[application_id] = future
        answer = None
        try:
            response, answer = await self._decide_new(job)
            return response
        finally:
            del self.inflight[application_id]
            future.set_result(answer)

    # --------------------------------------------------------------- decision steps
    async def _decide_new(self, job: Any) -> tuple[Response, str | None]:
        """Steps 3-7 of the module docstring; returns the response and the answer it carries."""
        from mlplatform.serving.engine import answer_for

        outcome = await self._decide_batch(job)
        if outcome.unconfirmable:
            message = (
                "the idempotency store is unreachable, so whether this application was decided before cannot be "
                "confirmed; retry the same request later (a new checkout gets a decision now: send it with a new "
                "application_id and the current time)"
            )
            return error_response(503, "decision_unconfirmed", message), None
        if outcome.stored is not None:
            return self._replayed(outcome.stored, job), outcome.stored
        if outcome.wait:
            stored = await self._wait_for_answer(job)
            if stored is None:
                message = "a copy of this application is still being decided by another replica; retry the same request shortly"
                return error_response(409, "decision_in_progress", message), None
            return self._replayed(stored, job), stored
        decided = time.perf_counter()
        try:
            await self.log.append(outcome.record)
        except Exception as exc:  # not durable: the decision must not be given
            log.error("decision %s not logged: %r", outcome.record["decision_id"], exc)
            self.metrics.log_failures.inc()
            return error_response(503, "decision_log_unavailable", "the decision could not be recorded; retry the same request"), None
        logged = time.perf_counter()
        application_id = job.request.application_id
        winner = None
        if outcome.confirmed:
            winner = await self._commit_batch((application_id, outcome.answer, job.started + self.settings.deadline_s))
        else:
            await self._keep_batch((application_id, outcome.answer))
        phases = self.phases
        phases[0] += 1
        phases[1] += decided - job.started
        phases[2] += logged - decided
        phases[3] += time.perf_counter() - logged
        if winner is not None:  # a copy stored its answer first (our reservation had lapsed)
            try:
                await self.log.append({**outcome.record, "returned": False})
            except Exception as exc:
                log.error("decision %s not marked as not returned: %r", outcome.record["decision_id"], exc)
            status, content = answer_for(winner, job.fingerprint)
            self.metrics.replays.inc()
            return Response(content, status_code=status, media_type="application/json"), winner
        self._remember(application_id, outcome.answer)
        self.metrics.decided(outcome.decision, outcome.fallback_reason, time.perf_counter() - job.started)
        return Response(outcome.body, media_type="application/json"), outcome.answer

    async def _off_clock(self, job: Any, skew: float) -> Response:
        """A request whose timestamp is too far from the server clock: its earlier answer if the
        application was decided before (a late retry), else a 422 naming ``timestamp``."""
        try:
            stored = (await self._bounded(lambda: self.idempotency.get_many([job.request.application_id]), job.started + self.settings.deadline_s))[0]
        except (IdempotencyUnavailable, TimeoutError):
            stored = None
        if stored is not None and not is_pending(stored):
            return self._replayed(stored, job)
        side = "ahead of" if skew > 0 else "behind"
        message = (
            f"timestamp: {job.request.timestamp.isoformat()} is {abs(skew):.0f} s {side} the server clock; an online decision "
            f"uses the features as of now, so send the time the customer applied (within serving.max_clock_skew, "
            f"{self.settings.max_clock_skew_s:.0f} s); score past applications with batch scoring"
        )
        problem = {"field": "timestamp", "message": message, "type": "clock_skew"}
        return JSONResponse({"error": "invalid_request", "message": message, "problems": [problem]}, status_code=422)

    async def _wait_for_answer(self, job: Any) -> str | None:
        """Poll the store until the copy decided elsewhere has its answer stored (None: it did
        not within the deadline plus ``WAIT_MARGIN_S``, or its reservation vanished)."""
        application_id = job.request.application_id
        until = job.started + self.settings.deadline_s + WAIT_MARGIN_S
        delay = 0.002
        while time.perf_counter() < until:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
            try:
                value = (await self._bounded(lambda: self.idempotency.get_many([application_id]), until))[0]
            except (IdempotencyUnavailable, TimeoutError):
                value = self.unconfirmed.get(application_id)
                if value is None:
                    continue
            if value is None:
                return self.unconfirmed.get(application_id)
            if not is_pending(value):
                return value
        return None

    async def _bounded(self, call: Callable[[], T], deadline_at: float) -> T:
        """``call()`` on the replica's I/O threads, given until ``deadline_at`` (perf_counter).

        Raises:
            TimeoutError: it did not finish in time (it may still finish later, unobserved).
        """
        remaining = deadline_at - time.perf_counter()
        if remaining <= 0:
            raise TimeoutError("no time left in the request's budget")
        return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(self._io, call), remaining)

    # ------------------------------------------------------------------ micro-batches
    # Several batches at once: a batch waiting on a slow store must not hold up the requests
    # that arrive meanwhile (they would wait for its whole deadline before their own began).
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0, max_concurrent_batches=_IO_THREADS)
    async def _decide_batch(self, jobs: list[Any]) -> list[Any]:
        """Reserve, then decide, a micro-batch (steps 3-4); one outcome per job."""
        from mlplatform.serving.engine import Outcome

        self.batches["decide"][0] += 1
        self.batches["decide"][1] += len(jobs)
        started = min(j.started for j in jobs)
        deadline_at = started + self.settings.deadline_s
        marker = pending_marker(f"{self.replica_id}:{uuid.uuid4().hex[:12]}")
        entries = [(j.request.application_id, marker) for j in jobs]
        store_down = False
        try:
            # Half the budget at most: a store that has not answered by then is taken as down.
            found: list[str | None] | None = await self._bounded(
                lambda: self.idempotency.reserve_many(entries), started + self.settings.deadline_s / 2
            )
        except (IdempotencyUnavailable, TimeoutError) as exc:
            log.warning("idempotency store not reserved for %d decisions (deciding unconfirmed): %s", len(jobs), exc or "timed out")
            found, store_down = None, True
        outcomes: list[Any] = [None] * len(jobs)
        todo = []
        now = datetime.now(UTC)
        for i, job in enumerate(jobs):
            value = None if found is None else found[i]
            if found is None:
                # Without the store, only this node knows what was answered before: a request
                # it has no answer for is decided only if it is fresh (a first attempt); an
                # older one may be a retry of a decision the store holds, so it is refused.
                value = self.unconfirmed.get(job.request.application_id)
                if value is None and (now - job.request.timestamp).total_seconds() > FRESH_S:
                    outcomes[i] = Outcome(unconfirmable=True)
                    continue
            if value is None:
                todo.append(i)
            else:
                outcomes[i] = Outcome(wait=True) if is_pending(value) else Outcome(stored=value)
        if todo:
            batch = [jobs[i] for i in todo]
            if store_down and self._store_shared:  # the features live in the same store: don't wait on it twice
                decided = self.engine.fallback(batch, "feature_store_unavailable", scorer=self.watcher.current("production"))
            else:
                decided = await self._decide_jobs(batch, deadline_at)
            for i, outcome in zip(todo, decided):
                if found is None:
                    outcome.confirmed = False
                    outcome.record["confirmed"] = False
                outcomes[i] = outcome
        return outcomes

    async def _decide_jobs(self, jobs: list[Any], deadline_at: float) -> list[Any]:
        try:
            outcomes, timings = await self._bounded(lambda: self.engine.decide(jobs, deadline_at=deadline_at), deadline_at)
        except TimeoutError:
            return self.engine.fallback(jobs, "deadline_exceeded", scorer=self.watcher.current("production"))
        except Exception:  # a bug must still answer, with the fallback
            log.exception("deciding a batch of %d failed", len(jobs))
            return self.engine.fallback(jobs, "internal_error", scorer=self.watcher.current("production"))
        if timings.lookup_s is not None:
            self.metrics.lookup_seconds.observe(timings.lookup_s)
        if timings.scoring_s is not None:
            self.metrics.scoring_seconds.observe(timings.scoring_s)
        return outcomes

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0, max_concurrent_batches=_IO_THREADS)
    async def _commit_batch(self, entries: list[tuple[str, str, float]]) -> list[str | None]:
        """Store the answers over their reservations (step 6); per entry the answer that won
        if it is not ours. An answer the store cannot take in time is kept unconfirmed."""
        deadline_at = max(min(d for _, _, d in entries), time.perf_counter() + _COMMIT_FLOOR_S)
        pairs = [(a, answer) for a, answer, _ in entries]
        try:
            results = await self._bounded(lambda: self.idempotency.put_if_absent_many(pairs), deadline_at)
        except (IdempotencyUnavailable, TimeoutError) as exc:
            # Answer anyway (the decision is logged); keep the answers for retries and the store.
            log.warning("idempotency store not written for %d decisions: %s", len(entries), exc or "timed out")
            await asyncio.get_running_loop().run_in_executor(self._disk, self.unconfirmed.add_many, pairs)
            return [None] * len(entries)
        return [None if r is None or r == answer else r for r, (_, answer) in zip(results, pairs)]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _keep_batch(self, entries: list[tuple[str, str]]) -> list[None]:
        """Keep unconfirmed answers on the node's disk, a micro-batch per folder fsync, on a
        thread of their own (the store's threads may all be stuck on a hung store)."""
        await asyncio.get_running_loop().run_in_executor(self._disk, self.unconfirmed.add_many, entries)
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

    def _sync_unconfirmed(self) -> None:
        """Write the node's unconfirmed answers into the idempotency store once it answers."""
        while not self._stop.wait(0.25):
            if not self.unconfirmed.any():  # waiting answers, or kept ones to expire
                continue
            try:
                stored, conflicts = self.unconfirmed.sync(self.idempotency)
            except IdempotencyUnavailable:
                continue
            except Exception:
                log.exception("writing unconfirmed answers to the idempotency store failed")
                continue
            if stored or conflicts:
                log.info("idempotency store now holds %d answers given while it was unreachable (%d conflicts)", stored, conflicts)

    def __del__(self) -> None:
        # Serve calls this on graceful shutdown; parts may be missing if __init__ failed.
        if hasattr(self, "_stop"):
            self._stop.set()
        if hasattr(self, "watcher"):
            self.watcher.stop()
        if getattr(self, "offer_watcher", None) is not None:
            self.offer_watcher.stop()
        if hasattr(self, "metrics"):
            self.metrics.close()
        if hasattr(self, "model_server"):
            self.model_server.stop()
        if hasattr(self, "log"):
            self.log.close()  # rolls the open segment so any compactor may take it
        FastRoutes.serve({})
        for pool in ("_io", "_disk"):
            if hasattr(self, pool):
                getattr(self, pool).shutdown(wait=False, cancel_futures=True)


ServingApp = serve.deployment(name="mlplatform", max_ongoing_requests=64, graceful_shutdown_timeout_s=10)(
    serve.ingress(app)(ServingReplica)
)


