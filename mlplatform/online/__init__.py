"""Online store backends: where the latest feature values per entity live, for serving.

    store = open_online_store(config, storage)      # SQLite or Redis, as config.online_store says
    store.read(view, keys, ["loans_30d"], now)

Backends share one contract (``OnlineStore`` in ``base``): ``sqlite`` (embedded default, one
machine) and ``redis`` (production, Redis or Redis Cluster), chosen by ``online_store.type``.
What goes into them and how it is read with the feature store's semantics is the feature
store's: ``mlplatform.features.materialize``, ``.push``, ``.online_lookup`` and ``.latest_rows``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mlplatform.online.base import FeatureStatus, FeatureValue, OnlineStore, OnlineStoreUnavailable

if TYPE_CHECKING:
    from mlplatform.config import PlatformConfig
    from mlplatform.storage import Storage

__all__ = ["FeatureStatus", "FeatureValue", "OnlineStore", "OnlineStoreUnavailable", "open_online_store"]


def open_online_store(config: PlatformConfig, storage: Storage) -> OnlineStore:
    """The online store ``config.online_store`` describes (nothing connects until first use).

    SQLite without a ``path`` lives at ``<storage root>/online/online.db`` when the root is a
    local directory. With an ``s3://`` root there is no local root to put it under, so it is
    ``./.mlplatform-online/<project>.db`` relative to the directory of the process that opens
    it (made absolute then, so Ray tasks given the store write the same file); set
    ``online_store.path`` to choose, or use Redis beyond one machine.
    """
    online = config.online_store
    if online.type == "redis":
        from mlplatform.online.redis import RedisOnlineStore

        return RedisOnlineStore(
            online.url,
            project=config.project,
            key_prefix=online.key_prefix,
            timeout=online.timeout,
            keep_generations=online.keep_generations,
        )
    from mlplatform.online.sqlite import SqliteOnlineStore

    keep = online.keep_generations
    if online.path is not None:
        return SqliteOnlineStore(online.path, keep_generations=keep)
    if storage.is_s3:
        return SqliteOnlineStore(Path(".mlplatform-online") / f"{config.project}.db", keep_generations=keep)
    return SqliteOnlineStore(Path(storage.root) / "online" / "online.db", keep_generations=keep)
