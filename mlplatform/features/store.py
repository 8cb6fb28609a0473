"""``platform.features``: the feature store's front door, offline and online.

    platform.features.apply(definitions)          # register / version definitions
    platform.features.list_feature_views()
    platform.features.backfill("applicant_history", start, end)
    platform.features.get_historical_features(entities, "underwriting_v1")
    platform.features.materialize(start, end)     # offline -> online
    platform.features.rollback("applicant_history")  # the previous online generation, atomically
    platform.features.get_online_features("underwriting_v1", {"applicant_id": [1, 2], ...})
    platform.features.ingest("checkouts", events)  # real-time events onto the event bus
    platform.features.start_processors()          # event bus -> online state and offline log

Each capability lives in its own module of ``mlplatform.features`` and takes the store; this
class only hands off. ``Platform`` builds it from the collaborators it names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from mlplatform.errors import ConfigError, DefinitionError
from mlplatform.features.definitions import (
    Definition,
    Entity,
    FeatureService,
    FeatureView,
    OnDemandFeatureView,
    ParquetSource,
    RequestSource,
    StreamSource,
    parse_ref,
)
from mlplatform.features.registry import ApplyResult, FeatureRegistry

if TYPE_CHECKING:
    import ray.data

    from mlplatform.config import FeaturesConfig, RedisStreamsConfig, SqliteStreamsConfig
    from mlplatform.features.ingest import IngestResult
    from mlplatform.features.backfill import BackfillResult
    from mlplatform.features.consistency import ConsistencyReport
    from mlplatform.features.consistency_reports import ConsistencyReportInfo
    from mlplatform.features.materialize import MaterializeResult
    from mlplatform.features.online_lookup import OnlineResponse
    from mlplatform.features.push import PushMode
    from mlplatform.features.rollback import GenerationInfo, RollbackResult
    from mlplatform.features.stream_processor import StreamProcessors
    from mlplatform.online import OnlineStore
    from mlplatform.storage import DatasetStore, Storage
    from mlplatform.streams import EventBus

OFFLINE_PREFIX = "offline"


def offline_dataset(view: str) -> str:
    """Dataset name of a view's offline data under the storage root."""
    return f"{OFFLINE_PREFIX}/{view}"


class FeatureStore:
    """Definitions (a versioned registry), offline data and online data, under one storage root.

        store = FeatureStore(config.features, storage, DatasetStore(storage),
                             online_store=open_online_store(config, storage), ray=platform.ray,
                             bus=open_event_bus(config.streams, storage, project=config.project),
                             streams=config.streams)

    Args:
        config: the ``features`` section of the platform config (bounds on pushed event times).
        storage: the storage root; the registry and materialization state live under it.
        datasets: the versioned datasets under that root (offline data, training sets).
        online_store: where materialize and push write and lookups read.
        ray: connects to Ray (or returns the connected module); called only by the operations
            that run on Ray (backfill, training sets, materialize, stream processors).
        bus: the event bus that ``ingest`` appends to and the stream processors read.
        streams: the ``streams`` config section (how many processors, batch size, flushes).
        decisions: reads the logged decisions since a time (serving's decision log), for
            ``consistency``.
    """

    def __init__(
        self,
        config: FeaturesConfig,
        storage: Storage,
        datasets: DatasetStore,
        *,
        online_store: OnlineStore,
        ray: Callable[[], Any],
        bus: EventBus | None = None,
        streams: SqliteStreamsConfig | RedisStreamsConfig | None = None,
        decisions: Callable[[datetime | None], list[dict[str, Any]]] | None = None,
        quality: Callable[[], Any] | None = None,
    ) -> None:
        self.config = config
        self.storage = storage
        self.datasets = datasets
        self.online_store = online_store
        self.ray = ray
        self.bus = bus
        self.streams = streams
        self.decisions = decisions
        self._quality = quality
        self.registry = FeatureRegistry(storage)

    def quality_gate(self) -> Any:
        """The data-quality gate (``mlplatform.quality.DataQuality``) backfills,
        materializations and training sets pass their data through before publishing it (None
        when this store was built without one). Called, never imported: quality uses features."""
        return self._quality() if self._quality is not None else None

    # ---------------------------------------------------------------- definitions
    def apply(self, objects: Iterable[Definition], *, force: bool = False, dry_run: bool = False) -> ApplyResult:
        """Register ``objects`` (and the entities and sources they use) as the next registry revision.

        Returns the diff; applying unchanged definitions is a no-op that writes nothing.

        Raises:
            DefinitionError: invalid definitions or references.
            ConflictError: a view with offline data would change how it is computed (use ``force``).
        """
        return self.registry.apply(objects, force=force, dry_run=dry_run, has_data=self.has_offline_data)

    def has_offline_data(self, view: FeatureView) -> bool:
        """Whether ``view`` has offline data (a backfill or push wrote some)."""
        return self.datasets.exists(offline_dataset(view.name))

    def list_entities(self) -> list[Entity]:
        return self.registry.list("entity")  # type: ignore[return-value]

    def get_entity(self, name: str) -> Entity:
        return self.registry.get("entity", name)  # type: ignore[return-value]

    def list_sources(self) -> list[ParquetSource]:
        return self.registry.list("source")  # type: ignore[return-value]

    def get_source(self, name: str) -> ParquetSource:
        return self.registry.get("source", name)  # type: ignore[return-value]

    def list_stream_sources(self) -> list[StreamSource]:
        return self.registry.list("stream_source")  # type: ignore[return-value]

    def get_stream_source(self, name: str) -> StreamSource:
        return self.registry.get("stream_source", name)  # type: ignore[return-value]

    def list_feature_views(self) -> list[FeatureView]:
        return self.registry.list("feature_view")  # type: ignore[return-value]

    def get_feature_view(self, name: str) -> FeatureView:
        return self.registry.get("feature_view", name)  # type: ignore[return-value]

    def list_request_sources(self) -> list[RequestSource]:
        return self.registry.list("request_source")  # type: ignore[return-value]

    def get_request_source(self, name: str) -> RequestSource:
        return self.registry.get("request_source", name)  # type: ignore[return-value]

    def list_on_demand_feature_views(self) -> list[OnDemandFeatureView]:
        return self.registry.list("on_demand_feature_view")  # type: ignore[return-value]

    def get_on_demand_feature_view(self, name: str) -> OnDemandFeatureView:
        return self.registry.get("on_demand_feature_view", name)  # type: ignore[return-value]

    def list_feature_services(self) -> list[FeatureService]:
        return self.registry.list("feature_service")  # type: ignore[return-value]

    def get_feature_service(self, name: str) -> FeatureService:
        return self.registry.get("feature_service", name)  # type: ignore[return-value]

    # ------------------------------------------------------------------ backfills
    def backfill(self, view: str | FeatureView, start: Any, end: Any) -> BackfillResult:
        """Compute ``view``'s offline rows for ``(start, end]`` with Ray Data and publish them,
        replacing that range; see ``mlplatform.features.backfill.backfill`` for the exact semantics
        (it logs a start line and the summary at INFO on ``mlplatform.features.backfill``).

            platform.features.backfill("applicant_history", "2024-01-01", "2024-07-01")

        Raises:
            NotFoundError: the view or its source dataset does not exist.
            DataError: bad range, or a source column is missing or unusable.
        """
        from mlplatform.features.backfill import backfill

        return backfill(self, view, start, end)

    # --------------------------------------------------------------- training sets
    def get_historical_features(
        self,
        entity_df: Any,
        features: FeatureService | str | Iterable[str],
        *,
        entity_timestamp: str = "event_timestamp",
        full_feature_names: bool = False,
        as_known_at: bool = False,
        include_event_timestamps: bool = False,
    ) -> ray.data.Dataset:
        """Point-in-time-correct features for each entity row; see
        ``mlplatform.features.retrieval.get_historical_features`` for the exact semantics."""
        from mlplatform.features.retrieval import get_historical_features

        return get_historical_features(
            self,
            entity_df,
            features,
            entity_timestamp=entity_timestamp,
            full_feature_names=full_feature_names,
            as_known_at=as_known_at,
            include_event_timestamps=include_event_timestamps,
        )

    def resolve_view(self, name: str) -> FeatureView | OnDemandFeatureView:
        """The registered feature view or on-demand view called ``name``.

        Raises:
            NotFoundError: no view of either kind has that name.
        """
        return self.registry.resolve_view(name)

    def resolve_features(self, features: FeatureService | str | Iterable[str]) -> list[str]:
        """Turn a FeatureService, its name, or a list of refs into a checked list of ``view:feature`` refs.

        Raises:
            DefinitionError: a reference is malformed or names an unknown view or feature.
        """
        if isinstance(features, FeatureService):
            refs = list(features.features)
        elif isinstance(features, str):
            if ":" in features:
                refs = [features]
            else:
                refs = list(self.get_feature_service(features).features)
        else:
            refs = list(features)
        if not refs:
            raise DefinitionError("no features requested: pass a FeatureService or a list of 'view:feature' refs")
        for ref in refs:
            view, feature = parse_ref(ref)
            self.resolve_view(view).feature(feature)
        return refs

    # ---------------------------------------------------------------------- online
    def materialize(self, start: Any, end: Any, views: Iterable[str | FeatureView] | None = None) -> list[MaterializeResult]:
        """Rebuild each view's online state from offline rows with ``start < event_timestamp <= end``,
        atomically per view; see ``mlplatform.features.materialize.materialize`` for the exact semantics.

            platform.features.materialize("2024-01-01", "2024-07-01")
        """
        from mlplatform.features.materialize import materialize

        return materialize(self, start, end, views)

    def materialize_incremental(self, end: Any, views: Iterable[str | FeatureView] | None = None) -> list[MaterializeResult]:
        """Bring each view's online state up to ``end`` from where the last run ended; see
        ``mlplatform.features.materialize.materialize_incremental``."""
        from mlplatform.features.materialize import materialize_incremental

        return materialize_incremental(self, end, views)

    def generations(self, view: str) -> list[GenerationInfo]:
        """The kept online generations of ``view``, current first; see ``mlplatform.features.rollback``."""
        from mlplatform.features.rollback import generations

        return generations(self, view)

    def rollback(self, view: str, generation: str | int | None = None) -> RollbackResult:
        """Make the previous (or a named) kept generation of ``view`` current again, atomically,
        with no serving restart; see ``mlplatform.features.rollback.rollback`` for exactly what is
        restored and how incremental runs and pushes continue.

            platform.features.rollback("applicant_history")
        """
        from mlplatform.features.rollback import rollback

        return rollback(self, view, generation)

    def push(self, view: str | FeatureView, rows: Any, *, to: PushMode = "online_and_offline") -> int:
        """Write fresh rows of ``view`` online (visible at once) and offline (appended, created now);
        see ``mlplatform.features.push.push``. Returns the number of rows."""
        from mlplatform.features.push import push

        return push(self, view, rows, to=to)

    def get_online_features(
        self,
        features: FeatureService | str | Iterable[str],
        entities: Mapping[str, Sequence[Any]],
        *,
        full_feature_names: bool = False,
        now: datetime | None = None,
    ) -> OnlineResponse:
        """Current online values for each entity row, Feast-style; see
        ``mlplatform.features.online_lookup.get_online_features`` for the exact semantics.

            platform.features.get_online_features("underwriting_v1", {"applicant_id": [1, 2], ...})
        """
        from mlplatform.features.online_lookup import get_online_features

        return get_online_features(self, features, entities, full_feature_names=full_feature_names, now=now)

    # -------------------------------------------------------------------- streaming
    def ingest(self, source: str, rows: Any) -> IngestResult:
        """Check events of stream source ``source`` and append them to the event bus, all or
        none; see ``mlplatform.features.ingest.ingest`` for what an event must hold.

            platform.features.ingest("checkouts", [{"event_id": "c-1", "applicant_id": 42, ...}])

        Raises:
            NotFoundError: no stream source of that name is registered.
            DataError: a bad event (the message names its row and field); nothing was appended.
            EventBusUnavailable: the bus did not confirm (ingesting again is safe).
        """
        from mlplatform.features.ingest import ingest

        stream = self.get_stream_source(source)
        required = {
            key: f"it is a join key of real-time view {view.name!r}"
            for view in self.list_feature_views()
            if view.is_realtime and view.source.name == stream.name
            for key in view.join_keys
        }
        return ingest(stream, rows, bus=self._bus(), config=self.config, required=required)

    def start_processors(self, sources: Iterable[str] | None = None, *, detached: bool = False) -> StreamProcessors:
        """Start the stream processors (Ray actors) of every registered stream source, or of
        ``sources``; see ``mlplatform.features.stream_processor`` for what they guarantee.

            processors = platform.features.start_processors()
            ...
            processors.stop()

        Raises:
            NotFoundError: a named stream source is not registered.
        """
        from mlplatform.features.stream_processor import start_processors

        if self.streams is None:
            raise ConfigError("this feature store was built without a streams config; build it with Platform")
        chosen = self.list_stream_sources() if sources is None else [self.get_stream_source(s) for s in sources]
        return start_processors(
            self.ray(),
            chosen,
            bus=self._bus(),
            storage=self.storage,
            online_store=self.online_store,  # type: ignore[arg-type]
            settings=self.streams,
            detached=detached,
        )

    def _bus(self) -> EventBus:
        if self.bus is None:
            raise ConfigError("this feature store was built without an event bus; build it with Platform")
        return self.bus

    # ---------------------------------------------------------------- consistency
    def consistency(
        self,
        feature_service: FeatureService | str,
        *,
        records: Sequence[Mapping[str, Any]] | None = None,
        since: datetime | None = None,
        sample: int | None = 1000,
        seed: int = 0,
    ) -> ConsistencyReport:
        """Training/serving skew on logged decisions: the served feature values against the
        same features recomputed offline as known at each decision's time.

            report = platform.features.consistency("underwriting_v1")
            report.flagged, report.per_feature, report.write(platform.storage, "reports/consistency/x")

        Args:
            feature_service: the service (or its name) the decisions were scored with.
            records: decision records; default the decision log (since ``since``).
            sample: compare at most this many decisions (None: all).

        See ``mlplatform.features.consistency`` for what is compared and reported.
        """
        from mlplatform.features.consistency import consistency_report

        if records is None:
            if self.decisions is None:
                raise ConfigError("this feature store was built without access to the decision log; pass records, or build it with Platform")
            records = self.decisions(since)
        return consistency_report(self, records, feature_service, sample=sample, seed=seed)

    def consistency_reports(self, *, limit: int | None = None) -> list[ConsistencyReportInfo]:
        """The consistency reports written under ``reports/consistency/`` (by ``mlp consistency``),
        newest first, with their summary figures (``mlplatform.features.consistency_reports``)."""
        from mlplatform.features.consistency_reports import consistency_reports

        return consistency_reports(self.storage, limit=limit)
