"""Sending generated requests and keeping count: the fuzz test's and the long run's harness.

    fuzzer = Fuzzer(deployed.url, key, workers=4)
    fuzzer.drive(REQUESTS["/v1/decisions"], examples=250)
    fuzzer.close()
    print(fuzzer.tally.table())          # route, requests, answers by status class, >= 500

``Fuzzer`` sends from several threads, so that the replicas batch requests together as under
real load (a batch with one bad body must not fail the others). ``Tally`` counts the answers
and keeps every 5xx with the exact body sent; each 5xx is also appended, as it comes, to
/tmp/fuzz_findings.txt (bodies over 3 KB whole in /tmp/fuzz_findings/<sha256>.bin). A
request that gets no answer at all counts as a 599.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _fuzz_strategies import FuzzRequest
from hypothesis import strategies as st

__all__ = ["FINDINGS", "Fuzzer", "Tally", "record_finding", "send", "show_body"]

FINDINGS = Path("/tmp/fuzz_findings.txt")


def send(session: Any, base_url: str, request: FuzzRequest, key: str, timeout: float = 60.0) -> tuple[int, str, bytes | None]:
    """Send ``request`` with ``requests`` (the key in ``X-API-Key`` unless the request changes
    it); returns (status, response text, the body bytes sent)."""
    import requests

    headers: dict[str, Any] = {"X-API-Key": key}
    if request.method not in ("GET", "HEAD") or request.body is not None:
        headers["Content-Type"] = "application/json"
    for name, value in request.headers:
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    data = request.payload()
    url = base_url + request.path + (("?" + request.query) if request.query else "")
    prepared = requests.Request(request.method, "http://placeholder/", headers=headers,
                                data=(_chunks(data) if request.chunked and data else data)).prepare()
    prepared.url = url  # as written: requests would re-quote odd paths and queries
    response = session.send(prepared, timeout=timeout, allow_redirects=False)
    return response.status_code, response.text, data


class _Enough(Exception):
    """Raised inside a hypothesis run to end it once enough requests were sent."""


class Fuzzer:
    """Sends requests from ``workers`` threads (so the replicas batch them together, as under
    real load) and tallies the answers; ``drive`` feeds it a strategy through hypothesis.

        fuzzer = Fuzzer(url, key)
        fuzzer.drive(REQUESTS["/push"], examples=200)
        fuzzer.close()
        print(fuzzer.tally.table())
    """

    def __init__(self, base_url: str, key: str, *, workers: int = 4, source: str = "") -> None:
        import threading
        from concurrent.futures import ThreadPoolExecutor

        self.base_url, self.key, self.source, self.workers = base_url, key, source, workers
        self.tally = Tally()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="fuzz")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._pending: list[Any] = []
        self._seen: set[bytes] = set()
        self.repeats = 0  # generated again and not sent twice

    def submit(self, request: FuzzRequest) -> bool:
        """Send ``request`` unless the same one was sent before; returns whether it was sent."""
        fingerprint = hashlib.sha256(repr(request).encode("utf-8", "surrogatepass")).digest()
        if fingerprint in self._seen:
            self.repeats += 1
            return False
        self._seen.add(fingerprint)
        self._pending.append(self._pool.submit(self._one, request))
        if len(self._pending) >= self.workers * 4:  # bounded: generation waits for the server
            self._pending.pop(0).result()
        return True

    def wait(self) -> None:
        while self._pending:
            self._pending.pop(0).result()

    def close(self) -> None:
        self.wait()
        self._pool.shutdown()

    def drive(self, strategy: st.SearchStrategy[FuzzRequest], examples: int, seed: int | None = None) -> int:
        """Send ``examples`` distinct requests drawn from ``strategy`` (hypothesis draws some
        twice: those are sent once, and more are drawn to make up for them, up to 3x
        ``examples`` draws). Derandomized (the same requests every run) unless a ``seed`` is
        given. Returns how many were sent."""
        from hypothesis import HealthCheck, Phase, Verbosity, given, settings
        from hypothesis import seed as with_seed

        sent = 0

        @settings(max_examples=3 * examples, database=None, deadline=None, derandomize=seed is None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck), print_blob=False, verbosity=Verbosity.quiet)
        @given(strategy)
        def run(request: FuzzRequest) -> None:
            nonlocal sent
            if sent >= examples:
                raise _Enough  # the only way to end a hypothesis run early
            if self.submit(request):
                sent += 1

        try:
            (with_seed(seed)(run) if seed is not None else run)()
        except _Enough:
            pass
        self.wait()
        return sent

    def _one(self, request: FuzzRequest) -> None:
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        try:
            status, text, sent = send(session, self.base_url, request, self.key)
        except requests.RequestException as exc:  # no answer at all: as bad as a 5xx
            self._local.session = None
            status, text, sent = 599, f"no response: {exc!r}", request.payload()
        with self._lock:
            self.tally.add(request, status, text, sent, self.source)


def _chunks(data: bytes):
    for i in range(0, len(data), 4096):
        yield data[i : i + 4096]


@dataclass
class Tally:
    """Answers per route by status class, the 5xx with their requests, and broken contracts."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    server_errors: list[dict[str, Any]] = field(default_factory=list)
    broken: list[dict[str, Any]] = field(default_factory=list)

    def add(self, request: FuzzRequest, status: int, text: str, sent: bytes | None, source: str = "") -> None:
        row = self.counts.setdefault(request.route, {})
        kind = f"{status // 100}xx"
        row[kind] = row.get(kind, 0) + 1
        if status >= 500:
            finding = _finding(request, status, text, sent, source)
            self.server_errors.append(finding)
            record_finding(finding)
        elif request.must_reject and status < 400:
            self.broken.append(_finding(request, status, text, sent, source) | {"why": "an invalid request was accepted"})
        elif status == 422 and not _names_error(text):
            self.broken.append(_finding(request, status, text, sent, source) | {"why": "422 without a JSON {error, message}"})

    def total(self, route: str | None = None) -> int:
        rows = [self.counts.get(route, {})] if route else list(self.counts.values())
        return sum(sum(r.values()) for r in rows)

    def table(self) -> str:
        classes = ["2xx", "3xx", "4xx", "5xx"]
        lines = [f"{'route':24s} {'requests':>9s} " + " ".join(f"{c:>7s}" for c in classes) + f" {'>=500':>6s}"]
        for route in sorted(self.counts):
            row = self.counts[route]
            lines.append(f"{route:24s} {sum(row.values()):9d} " + " ".join(f"{row.get(c, 0):7d}" for c in classes)
                         + f" {row.get('5xx', 0):6d}")
        lines.append(f"{'all':24s} {self.total():9d}")
        return "\n".join(lines)


def _names_error(text: str) -> bool:
    try:
        doc = json.loads(text)
    except ValueError:
        return False
    return isinstance(doc, dict) and isinstance(doc.get("error"), str) and isinstance(doc.get("message"), str)


def _finding(request: FuzzRequest, status: int, text: str, sent: bytes | None, source: str) -> dict[str, Any]:
    return {
        "source": source,
        "route": request.route,
        "label": request.label,
        "method": request.method,
        "path": request.path + (("?" + request.query) if request.query else ""),
        "headers": dict(request.headers),
        "status": status,
        "response": text[:2000],
        "body": sent,
    }


def show_body(sent: bytes | None, limit: int = 3000) -> str:
    """The body as it went out: exact up to ``limit`` bytes, else its head, tail, length and hash."""
    if sent is None:
        return "(no body)"
    if len(sent) <= limit:
        return repr(sent)
    return (f"{len(sent)} bytes, sha256 {hashlib.sha256(sent).hexdigest()[:16]}: "
            f"{sent[: limit // 2]!r} ... {sent[-limit // 4 :]!r}")


def record_finding(finding: dict[str, Any]) -> None:
    """Append one 5xx to /tmp/fuzz_findings.txt (read while the run goes on); bodies over 3 KB
    are also kept whole in /tmp/fuzz_findings/<sha256>.bin."""
    sent = finding["body"]
    if sent is not None and len(sent) > 3000:
        keep = FINDINGS.with_suffix("")
        keep.mkdir(exist_ok=True)
        (keep / f"{hashlib.sha256(sent).hexdigest()}.bin").write_bytes(sent)
    text = (
        f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {finding['source']} {finding['method']} {finding['path']} -> {finding['status']}\n"
        f"label: {finding['label']}\nheaders: {finding['headers']!r}\nbody: {show_body(sent)}\nresponse: {finding['response'][:800]}\n"
    )
    with FINDINGS.open("a") as f:
        f.write(text)
