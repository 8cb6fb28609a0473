"""The storage root: one API over a local directory and an S3 prefix.

    storage = Storage(StorageConfig(root="s3://risk-ml/prod"))
    storage.write_json("registry/state.json", {...})        # atomic replace
    storage.create_json("models/pd/versions/7.json", {...})  # exclusive: False if it exists

Keys are ``/``-separated paths relative to the root. Every write is atomic for a reader: on
local disk the bytes go to a temporary file that is renamed (or hard-linked, for exclusive
creates) into place; on S3 a PUT is atomic and exclusive creates use ``If-None-Match: *``,
so two writers racing for the same key cannot both win.

Credentials are never part of the config: they come from the environment or the standard
AWS chain on each node.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import uuid
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlplatform.config import StorageConfig
from mlplatform.errors import IntegrityError, NotFoundError, StorageError

if TYPE_CHECKING:
    import fsspec
    import pyarrow.fs

__all__ = ["Storage", "sha256_hex"]

_KEY = re.compile(r"^[A-Za-z0-9_=.@+-]+(/[A-Za-z0-9_=.@+-]+)*$")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Storage:
    """Blobs, JSON documents and files under one root URI (local path or ``s3://bucket/prefix``).

    Picklable: Ray tasks receive a ``Storage`` and open their own filesystem handles.
    """

    def __init__(self, config: StorageConfig) -> None:
        self.config = config
        if config.is_s3:
            self.root = config.root
            self._base = config.root.removeprefix("s3://")
        else:
            self.root = str(Path(config.root).expanduser().resolve())
            self._base = self.root

    def __repr__(self) -> str:
        return f"Storage({self.root!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["config"])

    @property
    def is_s3(self) -> bool:
        return self.config.is_s3

    # ----------------------------------------------------------------------------- paths
    @staticmethod
    def check_key(key: str) -> str:
        key = key.strip("/")
        if not _KEY.match(key) or any(part in (".", "..") for part in key.split("/")):
            raise StorageError(
                f"invalid storage key {key!r}: use '/'-separated names of letters, digits and _ = . @ + -"
            )
        return key

    def path(self, key: str = "") -> str:
        """The filesystem path of ``key`` (``bucket/prefix/key`` on S3, an absolute path locally)."""
        if not key:
            return self._base
        return posixpath.join(self._base, self.check_key(key))

    def uri(self, key: str = "") -> str:
        """A URI a person or another tool can use: ``s3://bucket/prefix/key`` or an absolute path."""
        path = self.path(key)
        return f"s3://{path}" if self.is_s3 else path

    def key_of(self, path: str) -> str:
        """Inverse of ``path``: the key of a filesystem path under the root."""
        path = path.removeprefix("s3://")
        if not path.startswith(self._base):
            raise StorageError(f"{path!r} is not under the storage root {self.root!r}")
        return path[len(self._base) :].strip("/")

    # ---------------------------------------------------------------------- filesystems
    @cached_property
    def fs(self) -> fsspec.AbstractFileSystem:
        """An fsspec filesystem for the root (s3fs on S3)."""
        if not self.is_s3:
            from fsspec.implementations.local import LocalFileSystem

            return LocalFileSystem(auto_mkdir=True)
        import s3fs

        client_kwargs = {"region_name": self.config.s3.region} if self.config.s3.region else {}
        return s3fs.S3FileSystem(
            endpoint_url=self.config.s3.endpoint_url,
            client_kwargs=client_kwargs,
            use_listings_cache=False,
            skip_instance_cache=True,
        )

    @cached_property
    def arrow_fs(self) -> pyarrow.fs.FileSystem:
        """A pyarrow filesystem for Parquet I/O and Ray Data (native S3 client on S3)."""
        import pyarrow.fs as pafs

        if not self.is_s3:
            return pafs.LocalFileSystem()
        kwargs: dict[str, Any] = {}
        s3 = self.config.s3
        if s3.endpoint_url:
            scheme, _, host = s3.endpoint_url.partition("://")
            kwargs.update(endpoint_override=host, scheme=scheme)
        if s3.region:
            kwargs["region"] = s3.region
        # Only static credentials from the environment travel with the (pickled) filesystem;
        # otherwise each node resolves its own through the AWS chain (instance role).
        if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
            kwargs.update(
                access_key=os.environ["AWS_ACCESS_KEY_ID"],
                secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
                session_token=os.environ.get("AWS_SESSION_TOKEN"),
            )
        # S3 (and S3-compatible servers) answer 5xx / throttling now and then; the SDK's standard
        # retry strategy with backoff makes a write survive them instead of failing a whole job.
        kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=8)
        return pafs.S3FileSystem(**kwargs)

    def check_reachable(self) -> None:
        """Fail early, with a useful message, when the root cannot be used."""
        if not self.is_s3:
            try:
                Path(self.root).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StorageError(f"cannot create storage root {self.root!r}: {exc}") from None
            return
        bucket = self._base.split("/", 1)[0]
        try:
            self.fs.ls(bucket, refresh=True)
        except FileNotFoundError:
            raise StorageError(f"S3 bucket {bucket!r} of storage root {self.root!r} does not exist; create it first") from None
        except PermissionError as exc:
            raise StorageError(f"no access to S3 bucket {bucket!r}: {exc}; check the AWS credentials in the environment") from None
        except Exception as exc:  # endpoint down, DNS, TLS: all unusable for the same reason
            raise StorageError(f"cannot reach S3 for storage root {self.root!r}: {exc}") from None

    # ---------------------------------------------------------------------------- blobs
    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self.path(key)))

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(key))
        except FileNotFoundError:
            raise NotFoundError(f"nothing stored at {self.uri(key)!r}") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        """Replace ``key`` atomically: readers see the old bytes or the new, never a mix."""
        path = self.path(key)
        if self.is_s3:
            self.fs.pipe_file(path, data)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist yet. Returns False if another writer got there first."""
        path = self.path(key)
        if self.is_s3:
            try:
                self.fs.pipe_file(path, data, mode="create")
            except (FileExistsError, OSError) as exc:
                if _is_precondition_failure(exc):
                    return False
                raise
            # Read back: an S3-compatible server whose If-None-Match check is not atomic with
            # the write (seen with the loopback test server under load) can let two creates
            # both succeed; the one whose bytes are not there lost.
            return self.fs.cat_file(path) == data
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            # link() is atomic and fails if the target exists: the file appears complete or not at all.
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True

    def delete(self, key: str, recursive: bool = False) -> None:
        path = self.path(key)
        try:
            self.fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass

    def list(self, prefix: str) -> list[str]:
        """Names directly under ``prefix`` (files and folders), sorted; [] when it does not exist."""
        base = self.path(prefix).rstrip("/")
        try:
            entries = self.fs.ls(base, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        # S3 "directory marker" objects list as the folder itself; they are not children.
        return sorted({posixpath.basename(e.rstrip("/")) for e in entries if e.rstrip("/") != base})

    def walk_files(self, prefix: str) -> Iterator[str]:
        """Every file under ``prefix``, as keys relative to the root."""
        base = self.path(prefix)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return
        for path in sorted(found):
            yield self.key_of(path)

    # ----------------------------------------------------------------------------- JSON
    def read_json(self, key: str) -> Any:
        data = self.read_bytes(key)
        try:
            return json.loads(data)
        except ValueError as exc:
            raise StorageError(f"{self.uri(key)!r} is not valid JSON: {exc}") from None

    def write_json(self, key: str, value: Any) -> None:
        self.write_bytes(key, _dump_json(value))

    def create_json(self, key: str, value: Any) -> bool:
        return self.create(key, _dump_json(value))

    # ------------------------------------------------------------------------ artifacts
    def write_artifact(self, key: str, data: bytes) -> str:
        """Store ``data`` and return its sha256, to be recorded and checked by ``read_artifact``."""
        self.write_bytes(key, data)
        return sha256_hex(data)

    def read_artifact(self, key: str, sha256: str) -> bytes:
        """Read ``key`` and verify it against ``sha256``.

        Raises:
            IntegrityError: the bytes changed since they were written (tampering or corruption).
        """
        data = self.read_bytes(key)
        actual = sha256_hex(data)
        if actual != sha256:
            raise IntegrityError(
                f"artifact {self.uri(key)!r} has sha256 {actual[:12]}…, expected {sha256[:12]}…: it was modified "
                "after it was written; refusing to load it (re-register the model from its training run)"
            )
        return data


def _dump_json(value: Any) -> bytes:
    return json.dumps(value, indent=2, sort_keys=True, default=str).encode() + b"\n"


def _is_precondition_failure(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc} {getattr(exc, '__cause__', '')}"
    return isinstance(exc, FileExistsError) or "PreconditionFailed" in text or "412" in text
