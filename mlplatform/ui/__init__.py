"""The web UI: catalog, lineage, models, decisions (with replay) and operations, as
server-rendered pages over one storage root (``mlp ui``, or ``/ui`` of the Serve application).

    from mlplatform.ui import build_app
    app = build_app(platform)      # an ASGI app; every page needs a session (see ``session``)

Modules: ``app`` (routes, access, rendering), ``session`` (the signed cookie), ``catalog``,
``lineage``, ``models``, ``decisions``, ``operations`` (what each page shows, read through the
parts' public APIs), ``svg`` (the drawn graph and trends), ``server`` (``mlp ui``).
"""

from mlplatform.ui.app import build_app

__all__ = ["build_app"]
