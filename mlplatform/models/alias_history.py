"""The alias history: every alias move (and every refused promotion) of a model, with who, when,
why and the promotion gate's figures.

    platform.models.alias_history("underwriting")                  # oldest first
    platform.models.alias_history("underwriting", alias="production")

Layout under the storage root::

    models/<name>/alias_history/<alias>/<UTC stamp>-<uuid>.json     one document per event

Each event is its own document written once, atomically (``Storage.write_json``: a rename on
local disk, one PUT on S3), so concurrent moves never overwrite each other's records and a
reader sees whole records only. The file name starts with a sortable UTC time, so listing the
folder gives the order; two events in the same microsecond keep both (the uuid differs).
"""

from __future__ import annotations

import getpass
import os
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from mlplatform.storage import Storage

__all__ = ["AliasEvent", "current_user", "read_history", "record_event"]

PREFIX = "models"
#: ``set``: moved by ``set_alias`` (no gate); ``promoted``: the gate passed (or did not apply);
#: ``forced``: the gate failed and ``force=True`` moved it anyway; ``refused``: not moved.
Outcome = Literal["set", "promoted", "forced", "refused"]


@dataclass(frozen=True)
class AliasEvent:
    """One alias event. ``version`` is the version asked for (the alias points at it unless
    ``outcome`` is ``refused``); ``previous`` the version the alias pointed at before (None:
    unset). ``decision`` is the promotion gate's ``PromotionDecision.to_json()`` (None for
    ``set`` and for aliases the gate does not cover)."""

    model: str
    alias: str
    version: int
    previous: int | None
    outcome: Outcome
    at: datetime
    by: str
    reason: str | None
    decision: dict[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "at": self.at.isoformat()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AliasEvent:
        return cls(**{**data, "at": datetime.fromisoformat(data["at"])})

    def summary(self) -> str:
        """One line: when, the move (or refusal), who and why."""
        before = "unset" if self.previous is None else f"v{self.previous}"
        when = self.at.isoformat(timespec="seconds")
        if self.outcome == "refused":
            line = f"{when} {self.model} {self.alias}: v{self.version} REFUSED (stays {before})"
        else:
            line = f"{when} {self.model} {self.alias}: {before} -> v{self.version} ({self.outcome})"
        line += f" by {self.by}"
        return line + (f", reason: {self.reason}" if self.reason else "")


def current_user() -> str:
    """Who is acting: ``MLP_USER`` from the environment, else the login name, else ``unknown``."""
    name = os.environ.get("MLP_USER")
    if name:
        return name
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers (no passwd entry for the uid)
        return "unknown"


def record_event(storage: Storage, event: AliasEvent) -> None:
    """Append ``event`` to its model's history (one new document)."""
    stamp = event.at.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    storage.write_json(f"{_folder(event.model, event.alias)}/{stamp}-{uuid.uuid4().hex[:12]}.json", event.to_json())


def read_history(storage: Storage, model: str, alias: str | None = None) -> list[AliasEvent]:
    """Every recorded event of ``model`` (of one ``alias`` if given), oldest first."""
    aliases = [alias] if alias is not None else storage.list(f"{PREFIX}/{model}/alias_history")
    events = []
    for name in aliases:
        folder = _folder(model, name)
        for entry in storage.list(folder):
            if entry.endswith(".json"):
                events.append(AliasEvent.from_json(storage.read_json(f"{folder}/{entry}")))
    return sorted(events, key=lambda e: e.at)


def _folder(model: str, alias: str) -> str:
    return f"{PREFIX}/{model}/alias_history/{alias}"
