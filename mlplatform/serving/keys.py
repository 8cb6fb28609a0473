"""API keys and their roles, read where ``deploy`` runs; only digests reach the replicas.

    keys = load_keys(config.serving)     # ((sha256 hex, ("decide", "read_features")), ...)
    new_key(["decide"])                  # ("<secret key>", "decide:<sha256 hex>")

Three sources, all from the environment or a file, never from the YAML config:

- ``serving.api_key_env`` (``MLP_API_KEY``): plain keys, comma-separated for rotation, each
  holding ``serving.api_key_roles`` (by default ``decide``, ``predict`` and ``read_features``: what a
  checkout caller needs). Convenient on one machine; the key lives in the deploying shell.
- ``serving.api_key_digests_env`` (``MLP_API_KEY_DIGESTS``): entries ``role+role:sha256hex``,
  comma- or newline-separated: the key itself never has to be where ``deploy`` runs.
- ``serving.api_key_digests_file``: the same entries, one per line, ``#`` comments allowed.

Roles: ``decide`` (``POST /v1/decisions``), ``read_features`` (``/get-online-features``),
``write_features`` (``/push``), ``operate`` (``/v1/internal/…``). A key listed twice holds the
union of its roles. Keys are at least 16 characters (``MIN_KEY_LENGTH``).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Iterable
from typing import TYPE_CHECKING

from mlplatform.errors import ServingError

if TYPE_CHECKING:
    from mlplatform.config import ServingConfig

__all__ = ["MIN_KEY_LENGTH", "load_keys", "new_key", "parse_digest_entries"]

MIN_KEY_LENGTH = 16
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def load_keys(serving: ServingConfig) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Every configured key as ``(sha256 hex digest, roles)``.

    Raises:
        ServingError: no key at all, a plain key shorter than ``MIN_KEY_LENGTH``, or a
            malformed digest entry (the message names the source and the entry's position).
    """
    from mlplatform.config import ROLES

    keys: list[tuple[str, tuple[str, ...]]] = []
    raw = os.environ.get(serving.api_key_env, "")
    plain = [k.strip() for k in raw.split(",") if k.strip()]
    short = [i for i, k in enumerate(plain) if len(k) < MIN_KEY_LENGTH]
    if short:
        raise ServingError(f"API key(s) at position {short} in {serving.api_key_env} are shorter than {MIN_KEY_LENGTH} characters")
    keys += [(hashlib.sha256(k.encode()).hexdigest(), tuple(serving.api_key_roles)) for k in plain]
    entries = os.environ.get(serving.api_key_digests_env, "")
    if entries.strip():
        keys += parse_digest_entries(re.split(r"[,\n]", entries), source=f"${serving.api_key_digests_env}", roles=ROLES)
    if serving.api_key_digests_file:
        try:
            with open(serving.api_key_digests_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as exc:
            raise ServingError(f"serving.api_key_digests_file cannot be read: {exc.strerror}") from None
        keys += parse_digest_entries(lines, source="serving.api_key_digests_file", roles=ROLES)
    if not keys:
        raise ServingError(
            f"no API key: set the environment variable {serving.api_key_env} (serving.api_key_env) to a secret of at least "
            f"{MIN_KEY_LENGTH} characters, e.g. {serving.api_key_env}=$(openssl rand -hex 24), or give role keys as digests "
            f"in {serving.api_key_digests_env} (see `mlp keys create`); clients send the key as X-API-Key"
        )
    merged: dict[str, set[str]] = {}
    for digest, roles in keys:
        merged.setdefault(digest, set()).update(roles)
    return tuple((digest, tuple(sorted(roles))) for digest, roles in merged.items())


def parse_digest_entries(lines: Iterable[str], *, source: str, roles: Iterable[str]) -> list[tuple[str, tuple[str, ...]]]:
    """``role+role:sha256hex`` entries (blank lines and ``#`` comments skipped).

    Raises:
        ServingError: an entry without ``:``, with an unknown role or a digest that is not 64
            lowercase hex characters; the message names the source and the entry number, not
            the entry (it is a credential's digest).
    """
    known = set(roles)
    out = []
    for number, line in enumerate(lines, 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        names, sep, digest = entry.rpartition(":")
        wanted = [r.strip() for r in names.split("+") if r.strip()]
        if not sep or not wanted:
            raise ServingError(f"{source}, entry {number}: expected 'role+role:sha256hex', e.g. 'decide:<64 hex characters>'")
        unknown = [r for r in wanted if r not in known]
        if unknown:
            raise ServingError(f"{source}, entry {number}: unknown role(s) {unknown}; roles are {sorted(known)}")
        if not _DIGEST.match(digest.strip().lower()):
            raise ServingError(f"{source}, entry {number}: the digest must be 64 hex characters (sha256 of the key)")
        out.append((digest.strip().lower(), tuple(wanted)))
    return out


def new_key(roles: Iterable[str]) -> tuple[str, str]:
    """A new random key and its digest entry for ``MLP_API_KEY_DIGESTS``.

    Raises:
        ServingError: an unknown role.
    """
    from mlplatform.config import ROLES

    wanted = list(dict.fromkeys(roles))
    unknown = [r for r in wanted if r not in ROLES]
    if unknown or not wanted:
        raise ServingError(f"roles must be some of {list(ROLES)}, got {wanted}")
    key = secrets.token_hex(24)
    return key, f"{'+'.join(wanted)}:{hashlib.sha256(key.encode()).hexdigest()}"
