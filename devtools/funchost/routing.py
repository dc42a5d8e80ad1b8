"""How the Functions host picks a function for a request, and what it reads from ``host.json``.

The host builds one route per HTTP trigger from the template in its binding, under the
route prefix of ``host.json`` (``extensions.http.routePrefix``, default ``api``), and orders
them as ASP.NET Core's inbound route precedence does, segment by segment: a literal (1)
before a parameter with a constraint or a segment mixing text and parameters (2), before a
plain parameter (3), before a catch-all ``{*name}`` (4); for equal precedence the longer
template first. Literal segments match case-insensitively; a trailing slash is ignored. A
route whose methods do not include the request's is skipped and the next one tried, so a
known path called with another method reaches the catch-all when there is one. An empty
catch-all value is left out of the parameters; the prefix alone (``/api``) matches a
catch-all. Nothing matching: the host's bare 404 (also for ``OPTIONS`` and ``HEAD`` that no
function takes).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

_PARAMETER = re.compile(r"\{(\*{1,2})?([A-Za-z_][A-Za-z0-9_]*)((?::[^{}?=]+)*)(\?)?(?:=[^}]*)?\}")
ALL_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE"})


@dataclass(frozen=True)
class Route:
    """One HTTP-triggered function as the host routes to it."""

    function_id: str
    name: str
    template: str
    methods: frozenset[str]
    trigger_parameter: str
    pattern: re.Pattern[str]
    precedence: tuple[tuple[int, ...], int, str]

    def match(self, path: str) -> dict[str, str] | None:
        found = self.pattern.fullmatch(path)
        if found is None:
            return None
        return {name: value for name, value in found.groupdict().items() if value}


def _segment(segment: str) -> tuple[str, int]:
    """A template segment as a regex, and its precedence digit."""
    parameters = list(_PARAMETER.finditer(segment))
    if not parameters:
        return re.escape(segment), 1
    digit = 3
    if len(parameters) > 1 or parameters[0].span() != (0, len(segment)):
        digit = 2
    parts: list[str] = []
    position = 0
    for parameter in parameters:
        parts.append(re.escape(segment[position : parameter.start()]))
        star, name, constraint, optional = parameter.groups()
        if star:
            parts.append(f"(?P<{name}>.*)")
            digit = 4
        else:
            parts.append(f"(?P<{name}>[^/]+)" + ("?" if optional else ""))
            if constraint:
                digit = min(digit, 2)
        position = parameter.end()
    parts.append(re.escape(segment[position:]))
    return "".join(parts), digit


def compile_template(prefix: str, template: str) -> tuple[re.Pattern[str], tuple[int, ...]]:
    """The regex matching a route template's paths (under the prefix) and its precedence digits."""
    segments = [s for s in f"{prefix.strip('/')}/{template.strip('/')}".split("/") if s]
    regex = ""
    digits: list[int] = []
    for segment in segments:
        part, digit = _segment(segment)
        digits.append(digit)
        optional = digit == 4 or (digit == 3 and segment.endswith("?}"))
        # An optional last segment (catch-all or {name?}) may be absent, slash included.
        regex += f"(?:/{part})?" if optional else f"/{part}"
    # Literals match whatever their case; parameter values are taken as they come.
    pattern = re.compile(f"{regex}/?" if regex else "/?", re.IGNORECASE | re.DOTALL)
    return pattern, tuple(digits)


def route_from_binding(function_id: str, name: str, binding: dict[str, Any], prefix: str) -> Route:
    template = str(binding.get("route") or name)
    pattern, digits = compile_template(prefix, template)
    methods = binding.get("methods")
    allowed = frozenset(str(m).upper() for m in methods) if methods else ALL_METHODS
    return Route(
        function_id=function_id,
        name=name,
        template=template,
        methods=allowed,
        trigger_parameter=str(binding.get("name", "req")),
        pattern=pattern,
        precedence=(digits, -len(digits), template.lower()),
    )


class Router:
    """The routes of one loaded worker, in the host's order."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = sorted(routes, key=lambda r: r.precedence)

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]] | None:
        for route in self.routes:
            if method not in route.methods:
                continue
            parameters = route.match(path)
            if parameters is not None:
                return route, parameters
        return None


@dataclass(frozen=True)
class HostConfig:
    """What the emulator reads from ``host.json``."""

    route_prefix: str
    function_timeout: timedelta | None

    @classmethod
    def read(cls, app_dir: Path, env: dict[str, str]) -> HostConfig:
        """``host.json``, with the ``AzureFunctionsJobHost__...`` settings that override it in Azure."""
        path = app_dir / "host.json"
        data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        http = data.get("extensions", {}).get("http", {})
        prefix = env.get("AzureFunctionsJobHost__extensions__http__routePrefix", str(http.get("routePrefix", "api")))
        timeout = env.get("AzureFunctionsJobHost__functionTimeout", data.get("functionTimeout"))
        # Flex Consumption's default when host.json says nothing: 30 minutes.
        return cls(prefix, parse_timespan(str(timeout)) if timeout is not None else timedelta(minutes=30))


def parse_timespan(text: str) -> timedelta | None:
    """A .NET ``TimeSpan`` as ``host.json`` writes it (``[d.]hh:mm:ss[.fff]``); ``-1`` is no limit."""
    if text.strip() == "-1":
        return None
    found = re.fullmatch(r"(?:(\d+)\.)?(\d{1,2}):(\d{1,2}):(\d{1,2}(?:\.\d+)?)", text.strip())
    if found is None:
        raise ValueError(f"host.json: functionTimeout {text!r} is not a time span like 00:10:00")
    days, hours, minutes, seconds = found.groups()
    return timedelta(days=int(days or 0), hours=int(hours), minutes=int(minutes), seconds=float(seconds))
