"""Small pieces every tab uses: status boxes, error text, progress adapters."""
from __future__ import annotations

import html
import logging
import traceback

from sdlora.errors import describe, user_message

log = logging.getLogger("sdlora.ui")


def status_html(text: str = "", kind: str = "info") -> str:
    """A status line for the page (kind: info | ok | error | busy); the text is escaped."""
    if not text:
        return ""
    icon = {"error": "✖ ", "ok": "✔ ", "busy": "● "}.get(kind, "")
    body = html.escape(text).replace("\n", "<br>")
    return f'<div class="sdl-status sdl-{kind}" role="status">{icon}{body}</div>'


def error_html(e: BaseException, what: str) -> str:
    """The page's message for a failed action; unexpected errors are logged with their traceback."""
    if user_message(e) is None:
        log.error("%s failed:\n%s", what, traceback.format_exc())
    return status_html(f"{what} failed: {describe(e)}", "error")


class GradioProgress:
    """`progress(fraction, desc)` for the library-side code, drawn by a gr.Progress (or ignored)."""

    def __init__(self, progress=None):
        self.progress = progress

    def __call__(self, fraction: float, desc: str = "") -> None:
        if self.progress is not None:
            self.progress(max(0.0, min(1.0, fraction)), desc=desc)


def float_or(value, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default
