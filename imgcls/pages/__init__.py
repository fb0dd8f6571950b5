"""The pages imgcls serves itself: ``label.html`` (``imgcls label``), ``try.html`` (``imgcls
serve``'s ``GET /``) and their ``pages.css``. Plain HTML, CSS and a little JavaScript,
shipped as package data: no build step, nothing from a CDN, so they work offline."""

from __future__ import annotations

from importlib import resources


def page(name: str) -> bytes:
    """The bytes of the page file ``name`` (e.g. ``label.html``)."""
    return resources.files(__name__).joinpath(name).read_bytes()


def version() -> str:
    """imgcls's installed version, for the pages' and reports' headers."""
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("imgcls")
    except PackageNotFoundError:
        return "unknown"
