"""Markdown (model cards, consistency summaries) rendered to HTML that cannot carry markup of
its own: raw HTML in the source is shown as text, links with a script scheme are dropped
(markdown-it's ``validateLink``), tables become tables. Images named by a relative file name
are served from ``files`` (the version's checksummed files route)."""

from __future__ import annotations

from functools import cache
from typing import Any
from urllib.parse import quote

__all__ = ["render_markdown"]


def render_markdown(text: str, *, files: str | None = None) -> str:
    """``text`` (CommonMark with GitHub tables and strikethrough) as safe HTML.

    Args:
        files: URL prefix for images given by a plain file name (``![roc](roc.png)`` →
            ``{files}/roc.png``); without it such images are left out (no request to a
            path the UI does not serve).
    """
    return _parser().render(text, {"files": files})


@cache
def _parser() -> Any:
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False}).enable(["table", "strikethrough"])
    default_image = md.renderer.rules["image"]

    def image(renderer: Any, tokens: Any, idx: int, options: Any, env: dict[str, Any]) -> str:
        token = tokens[idx]
        src = str(token.attrGet("src") or "")
        if "/" not in src and ":" not in src and src:
            if not env.get("files"):
                return ""
            token.attrSet("src", f"{env['files']}/{quote(src, safe='')}")
        elif not src.startswith(("/", "data:image/")):
            return ""  # the page's policy loads images from this site only
        return default_image(tokens, idx, options, env)

    md.add_render_rule("image", image)
    return md
