"""Everything persistent lives under one root: blobs and JSON (``Storage``) and versioned,
atomically published Parquet datasets (``DatasetStore``)."""

from mlplatform.storage.blobs import Storage, sha256_hex
from mlplatform.storage.datasets import DatasetFile, DatasetStore, DatasetVersion, StagedWrite

__all__ = ["DatasetFile", "DatasetStore", "DatasetVersion", "StagedWrite", "Storage", "sha256_hex"]
