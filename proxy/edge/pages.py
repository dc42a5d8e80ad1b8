"""The two web pages and their static assets, served by the function app itself.

- ``GET /api/portal``: the attendee page (``proxy/static/portal.html``)
- ``GET /api/manage/portal``: the organizer page (``proxy/static/manage.html``)
- ``GET /api/portal/{asset}``: the pages' CSS and JavaScript, the one route for assets

Both pages load without a credential: they are plain HTML, CSS and a little
JavaScript, with nothing from another origin (no CDN, no font), so they work
offline on an event's network. The credential an attendee or organizer types
is kept in the tab's ``sessionStorage`` and sent in a header, never in a URL.

The files are read once per worker. Each page names its assets with a
``?v=`` fingerprint of their content: an asset asked for with its current
fingerprint is cached for a year (``immutable``), anything else, the pages
included, is revalidated every time (``no-cache`` with an ``ETag``), so a
deploy is seen at the next load. Each file is gzipped once, at load, for the
browsers that accept it (the Functions host does not compress). Every answer carries a strict
Content-Security-Policy (scripts and styles from this origin only, no inline
script, no framing, requests to this origin only) and ``Referrer-Policy:
no-referrer``.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response

from proxy.edge.handlers import answering
from proxy.errors import NotFound

STATIC = Path(__file__).parent.with_name("static")
ROUTE_PREFIX = "/api"  # host.json's routePrefix (DESIGN: "host.json keeps the route prefix api")
ASSET_ROUTE = f"{ROUTE_PREFIX}/portal"

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
# What the pages may do: their own scripts, styles and API, nothing else. No inline script or style
# attribute, no plugin, no form posting anywhere (the forms are handled by script), no framing.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
}
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"
# {{asset:site.css}} in a page becomes /api/portal/site.css?v=FINGERPRINT
_ASSET_REFERENCE = re.compile(r"\{\{asset:([A-Za-z0-9_.-]+)\}\}")
_ASSET_NAME = re.compile(r"[A-Za-z0-9_-]+\.(?:css|js|svg)")


@dataclass(frozen=True, slots=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str
    gzipped: bytes  # compressed once, at load: the Functions host does not compress answers

    @classmethod
    def of(cls, body: bytes, suffix: str) -> StaticFile:
        return cls(body, CONTENT_TYPES[suffix], f'"{fingerprint(body)}"', gzip.compress(body, 9, mtime=0))


def fingerprint(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()[:16]


class Pages:
    """The pages and assets of one worker, read from ``directory`` once."""

    def __init__(self, directory: Path = STATIC, *, entra_sign_in: bool = False, github_sign_in: bool = False) -> None:
        self.assets: dict[str, StaticFile] = {}
        for path in sorted(directory.iterdir()):
            if _ASSET_NAME.fullmatch(path.name):
                self.assets[path.name] = StaticFile.of(path.read_bytes(), path.suffix)
        self.pages = {
            name: StaticFile.of(self._render((directory / name).read_text(), entra_sign_in, github_sign_in), ".html")
            for name in ("portal.html", "manage.html")
        }

    def _render(self, html: str, entra_sign_in: bool, github_sign_in: bool) -> bytes:
        def reference(found: re.Match[str]) -> str:
            name = found.group(1)
            if name not in self.assets:
                raise ValueError(f"a page refers to {name}, which is not in {STATIC}")
            return f"{ASSET_ROUTE}/{name}?v={self.assets[name].etag.strip(chr(34))}"

        html = _ASSET_REFERENCE.sub(reference, html)
        # Whether the organizer page offers "Sign in with Microsoft" (App Service authentication,
        # proxy.config.principal),
        # and the attendee page "Sign in with GitHub" (proxy.edge.registration).
        html = html.replace("{{github}}", "on" if github_sign_in else "off")
        return html.replace("{{entra}}", "on" if entra_sign_in else "off").encode()

    @answering
    async def portal(self, request: Request, asset: str | None = None) -> Response:
        """``GET /api/portal`` (the attendee page) and ``GET /api/portal/{asset}``."""
        if not asset:
            return self._answer(request, self.pages["portal.html"], REVALIDATE)
        found = self.assets.get(asset)
        if found is None:
            raise NotFound(f"No page asset '{asset}'. The pages are /api/portal and /api/manage/portal.")
        current = request.query_params.get("v") == found.etag.strip('"')
        return self._answer(request, found, IMMUTABLE if current else REVALIDATE)

    @answering
    async def manage(self, request: Request) -> Response:
        """``GET /api/manage/portal``: the organizer page (no credential to load it)."""
        return self._answer(request, self.pages["manage.html"], REVALIDATE)

    def _answer(self, request: Request, page: StaticFile, cache_control: str) -> Response:
        headers = {**SECURITY_HEADERS, "cache-control": cache_control, "etag": page.etag, "vary": "accept-encoding"}
        if page.etag in (tag.strip() for tag in request.headers.get("if-none-match", "").split(",")):
            return Response(status_code=304, headers=headers)
        if "gzip" in request.headers.get("accept-encoding", "").lower():
            headers["content-encoding"] = "gzip"
            return Response(page.gzipped, headers=headers, media_type=page.content_type)
        return Response(page.body, headers=headers, media_type=page.content_type)
