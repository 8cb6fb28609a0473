"""``mlp ui WORKLOAD``: the web UI over the workload's storage root, served by uvicorn.

    mlp ui configs/underwriting.yaml                         # http://127.0.0.1:8090/
    mlp ui configs/underwriting.yaml --root-path /mlp        # behind a proxy that forwards /mlp/...

Needs no Ray: the pages read the storage root (registry, models, decision log, reports); only
replaying a decision loads its model, in this process. Keys come from the serving config's
key sources, as for the Serve application (``MLP_API_KEY`` by default).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any

__all__ = ["register", "serve_ui"]

log = logging.getLogger(__name__)


def serve_ui(platform: Any, *, host: str = "127.0.0.1", port: int = 8090, root_path: str = "") -> None:
    """Serve the UI until interrupted (blocking)."""
    import uvicorn

    from mlplatform.ui.app import build_app

    app = build_app(platform)
    log.info("ui: serving %s on http://%s:%d%s/", platform.storage.root, host, port, root_path)
    uvicorn.run(app, host=host, port=port, root_path=root_path.rstrip("/"), log_level="warning", access_log=False,
                proxy_headers=True, server_header=False)


def register(sub: Any, *, open_workload: Callable[[str], Any], open_platform: Callable[[Any], Any]) -> None:
    """Add ``mlp ui`` to the ``mlp`` parser's subcommands."""
    text = "Serve the web UI (catalog, lineage, models, decisions, operations) over the workload's storage root."
    p = sub.add_parser("ui", help=text, description=text)
    p.add_argument("workload", help="workload YAML, e.g. configs/underwriting.yaml")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8090, help="port (default 8090)")
    p.add_argument("--root-path", default="", help="path prefix a proxy serves the UI under, e.g. /mlp (default none)")

    def handler(args: argparse.Namespace) -> int:
        workload = open_workload(args.workload)
        platform = open_platform(workload)
        print(f"mlp ui: {workload.name} at http://{args.host}:{args.port}{args.root_path.rstrip('/')}/ (Ctrl-C to stop)", flush=True)
        try:
            serve_ui(platform, host=args.host, port=args.port, root_path=args.root_path)
        finally:
            platform.close()
        return 0

    p.set_defaults(handler=handler)
