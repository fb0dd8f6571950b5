"""What imgcls shows a person in a browser: the pages it serves itself, and the header of
its reports.

The pages are files in ``imgcls/pages/``: ``label.html`` (``imgcls label``), ``try.html``
(``imgcls serve``'s ``GET /``) and their ``pages.css``; plain HTML, CSS and a little
JavaScript shipped as package data: no build step, nothing from a CDN, so they work
offline."""

from __future__ import annotations

from importlib import resources


def page(name: str) -> bytes:
    """The bytes of the page file ``name`` (e.g. ``label.html``)."""
    return resources.files("imgcls").joinpath("pages", name).read_bytes()


def version() -> str:
    """imgcls's installed version, for the pages' and reports' headers."""
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("imgcls")
    except PackageNotFoundError:
        return "unknown"


def report_header(title: str, model: str | None, data: str, extra: list[tuple[str, str]] = ()) -> str:
    """The block at the top of every report a person reads (report.html, drift.html, the
    review contact sheet): its title, then the model, the data, the date and the imgcls
    version that made it, so that a report found later says what it is about. Styled
    inline, as each report has its own style sheet."""
    import html
    from datetime import datetime, timezone

    facts = [("model", model or "unknown"), ("data", data), *extra,
             ("date", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")), ("imgcls", version())]
    items = "".join(f'<dt style="color:#57606a">{html.escape(k)}</dt><dd style="margin:0;overflow-wrap:anywhere">'
                    f"{html.escape(str(v))}</dd>" for k, v in facts)
    return (f'<header class="imgcls-report" style="border-bottom:1px solid #d0d7de;margin-bottom:1em">'
            f'<h1 style="margin:.2em 0">{html.escape(title)}</h1>'
            f'<dl style="display:grid;grid-template-columns:max-content 1fr;gap:.15em 1em;margin:.5em 0 1em">'
            f"{items}</dl></header>")
