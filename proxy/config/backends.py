"""Upstream backends: which Azure OpenAI resources serve a model, in what order, and how healthy they are.

``AZURE_OPENAI_BACKENDS`` is a JSON array of backends::

    [{"name": "sweden", "endpoint": "https://a.openai.azure.com", "priority": 1, "weight": 3,
      "deployments": {"gpt-4o-mini": "gpt-4o-mini-ptu"}},
     {"name": "france", "endpoint": "https://b.openai.azure.com", "priority": 2,
      "api_key_setting": "AZURE_OPENAI_API_KEY_FRANCE"}]

- ``priority`` (default 1): lower is tried first; a priority is used only
  while none before it has a healthy backend for the model.
- ``weight`` (default 1): shares the load between backends of one priority.
- ``deployments``: the event's model name to the deployment name on that
  backend. Absent, the backend serves every model under its own name; given,
  it serves exactly the models it lists (a list of names means "these, under
  the same name"), so a provisioned deployment of one model can stand first.
- ``api_key_setting``: the name of another app setting that holds this
  backend's key, the fallback to the managed identity. Keys never sit in the
  JSON itself.

Without the setting, ``AZURE_OPENAI_ENDPOINT`` (with ``AZURE_OPENAI_API_KEY``)
is the one backend, named after its resource.

``Health`` is each worker's routing hint, kept per backend and model (Azure's
quotas are per deployment): a backend that answered 429 is *cooled* until its
``retry-after-ms`` / ``retry-after`` has passed and not called before; one
that failed ``FAILURES_TO_OPEN`` times in a row (5xx, connection failure,
timeout) is *open* for a back-off that doubles from ``OPEN_SECONDS`` up to
``MAX_OPEN_SECONDS``, then one request probes it again (half-open): success
closes it, failure opens it for longer. Nothing here needs to agree across
workers or instances: a worker that has not yet seen a backend's 429 learns
it from its own next request.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import orjson

FAILURES_TO_OPEN = 3
OPEN_SECONDS = 5.0
MAX_OPEN_SECONDS = 60.0
DEFAULT_RETRY_SECONDS = 5.0  # a 429 without Retry-After (Azure always sends one)
MAX_RETRY_SECONDS = 3600.0
_FIELDS = frozenset({"name", "endpoint", "priority", "weight", "deployments", "api_key_setting"})


@dataclass(frozen=True, slots=True)
class Backend:
    """One Azure OpenAI resource the proxy may call."""

    name: str
    endpoint: str
    priority: int = 1
    weight: float = 1.0
    # The event's model name to the deployment name here; None: every model, under its own name.
    deployments: Mapping[str, str] | None = None
    api_key: str | None = field(default=None, repr=False)

    def deployment(self, model: str) -> str | None:
        """The deployment that serves ``model`` here, or None when this backend does not serve it."""
        if self.deployments is None:
            return model
        return self.deployments.get(model)


def single_backend(endpoint: str, api_key: str | None) -> Backend:
    """``AZURE_OPENAI_ENDPOINT`` as the one backend, named after its resource (or host and port)."""
    parts = urlsplit(endpoint)
    host = parts.hostname or endpoint
    azure = host.endswith((".openai.azure.com", ".cognitiveservices.azure.com", ".services.ai.azure.com"))
    return Backend(name=host.split(".", 1)[0] if azure else parts.netloc or host, endpoint=endpoint, api_key=api_key)


def parse_backends(raw: str, setting: Callable[[str], str | None]) -> tuple[Backend, ...]:
    """Read ``AZURE_OPENAI_BACKENDS``; ``setting`` looks up the app settings keys are named in.

    Raises ``ValueError`` naming what is wrong (``proxy.config.settings`` adds the setting's name).
    """
    try:
        items = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"is not valid JSON ({exc})") from None
    if not isinstance(items, list) or not items:
        raise ValueError("must be a non-empty JSON array of backends")
    backends = [_backend(item, index, setting) for index, item in enumerate(items)]
    names = [backend.name for backend in backends]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"names backends twice: {', '.join(duplicates)}")
    return tuple(backends)


def _backend(item: Any, index: int, setting: Callable[[str], str | None]) -> Backend:
    where = f"backend {index + 1}"
    if not isinstance(item, dict):
        raise ValueError(f"{where} must be an object with name, endpoint, priority, weight, deployments")
    unknown = sorted(set(item) - _FIELDS)
    if unknown:
        raise ValueError(f"{where} has unknown fields: {', '.join(unknown)}")
    name, endpoint = item.get("name"), item.get("endpoint")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where} needs a 'name'")
    where = f"backend '{name}'"
    if not isinstance(endpoint, str) or not endpoint.startswith(("https://", "http://")):
        raise ValueError(f"{where} needs an 'endpoint' starting with https://")
    priority, weight = item.get("priority", 1), item.get("weight", 1)
    if type(priority) is not int or priority < 0:
        raise ValueError(f"{where}: 'priority' must be a whole number, 1 first")
    if type(weight) not in (int, float) or not 0 < weight < math.inf:
        raise ValueError(f"{where}: 'weight' must be a positive number")
    deployments = item.get("deployments")
    if isinstance(deployments, list) and all(isinstance(d, str) and d for d in deployments):
        deployments = {d: d for d in deployments}
    if deployments is not None and not (
        isinstance(deployments, dict) and all(isinstance(v, str) and v for v in deployments.values())
    ):
        raise ValueError(f"{where}: 'deployments' must map model names to deployment names")
    key_setting = item.get("api_key_setting")
    api_key = None
    if key_setting is not None:
        api_key = setting(key_setting) if isinstance(key_setting, str) else None
        if api_key is None:
            raise ValueError(f"{where}: its 'api_key_setting' names {key_setting!r}, which is not set")
    return Backend(name.strip(), endpoint.rstrip("/"), priority, float(weight), deployments, api_key)


def retry_after_seconds(headers: Mapping[str, str], now: Callable[[], float] = time.time) -> float:
    """How long a 429 asks to wait: ``retry-after-ms``, else ``retry-after`` (seconds or an HTTP date)."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            return _bounded(float(raw_ms) / 1000)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is not None:
        try:
            return _bounded(float(raw))
        except ValueError:
            try:
                return _bounded(parsedate_to_datetime(raw).timestamp() - now())
            except (TypeError, ValueError):
                pass
    return DEFAULT_RETRY_SECONDS


def _bounded(seconds: float) -> float:
    return min(MAX_RETRY_SECONDS, max(0.001, seconds)) if math.isfinite(seconds) else DEFAULT_RETRY_SECONDS


@dataclass(slots=True)
class _State:
    cooled_until: float = 0.0
    failures: int = 0  # in a row
    opens: int = 0  # times opened since the last success
    open_until: float = 0.0
    probing_until: float = 0.0  # a half-open probe is under way until then


@dataclass(frozen=True, slots=True)
class Plan:
    """The backends to try for one request, in order, and those cooled down (with the seconds left)."""

    order: list[Backend]
    cooled: list[tuple[float, Backend]]


class Health:
    """Per worker: which backends are cooled down or open, and the order to try them in."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None) -> None:
        self._clock = clock
        self._random = rng or random.Random()
        self._states: dict[tuple[str, str], _State] = {}

    def plan(self, backends: Iterable[Backend], model: str) -> Plan:
        """Healthy backends by priority, weighted within each; open ones last; cooled ones left out."""
        now = self._clock()
        ready: list[Backend] = []
        opened: list[tuple[float, Backend]] = []
        cooled: list[tuple[float, Backend]] = []
        for backend in backends:
            if backend.deployment(model) is None:
                continue
            state = self._states.get((backend.name, model))
            if state is None:
                ready.append(backend)
            elif state.cooled_until > now:
                cooled.append((state.cooled_until - now, backend))
            elif state.open_until > now or state.probing_until > now:
                opened.append((max(state.open_until, state.probing_until), backend))
            else:
                ready.append(backend)
        # All down is no reason to refuse: the open ones are still tried, the soonest due first.
        order = self._weighted(ready) + [backend for _, backend in sorted(opened, key=lambda pair: pair[0])]
        return Plan(order, sorted(cooled, key=lambda pair: pair[0]))

    def _weighted(self, backends: Sequence[Backend]) -> list[Backend]:
        """By priority; within one, a weighted random order (the first drawn in proportion to weight)."""
        keyed = [(b.priority, -(self._random.random() ** (1.0 / b.weight)), b) for b in backends]
        return [backend for *_, backend in sorted(keyed, key=lambda item: (item[0], item[1]))]

    def cooled_for(self, backend: Backend, model: str) -> float:
        """Seconds left of the backend's cooldown for the model (0 when it may be called)."""
        state = self._states.get((backend.name, model))
        return 0.0 if state is None else max(0.0, state.cooled_until - self._clock())

    def attempting(self, backend: Backend, model: str) -> None:
        """A request is about to go to ``backend``: past its open interval, that request is the probe."""
        state = self._states.get((backend.name, model))
        now = self._clock()
        if state is not None and state.opens and state.open_until <= now and state.probing_until <= now:
            state.probing_until = now + _open_seconds(state.opens)

    def succeeded(self, backend: Backend, model: str) -> None:
        state = self._states.get((backend.name, model))
        if state is not None and state.cooled_until <= self._clock():
            del self._states[(backend.name, model)]
        elif state is not None:
            state.failures = state.opens = 0
            state.open_until = state.probing_until = 0.0

    def throttled(self, backend: Backend, model: str, seconds: float) -> None:
        """A 429: not called again for ``seconds``, by any request of this worker."""
        state = self._states.setdefault((backend.name, model), _State())
        state.cooled_until = max(state.cooled_until, self._clock() + seconds)
        state.probing_until = 0.0

    def failed(self, backend: Backend, model: str) -> None:
        """A 5xx, connection failure or timeout; the ``FAILURES_TO_OPEN``-th in a row opens it."""
        state = self._states.setdefault((backend.name, model), _State())
        state.failures += 1
        state.probing_until = 0.0
        if state.failures >= FAILURES_TO_OPEN or state.opens:  # a failed probe opens it again, for longer
            state.opens += 1
            state.failures = 0
            state.open_until = self._clock() + _open_seconds(state.opens)

    def report(self, backends: Iterable[Backend]) -> list[dict[str, Any]]:
        """Each backend's state per model as this worker sees it, for ``/api/health`` (no endpoints, no keys)."""
        now = self._clock()
        rows: list[dict[str, Any]] = []
        for backend in backends:
            models: dict[str, str] = {}
            for (name, model), state in sorted(self._states.items()):
                if name != backend.name:
                    continue
                if state.cooled_until > now:
                    models[model] = f"cooled for {state.cooled_until - now:.1f} s"
                elif state.open_until > now:
                    models[model] = f"open for {state.open_until - now:.1f} s"
                elif state.opens:
                    models[model] = "half-open"
            rows.append(
                {"name": backend.name, "priority": backend.priority, "weight": backend.weight, "models": models}
            )
        return rows


def _open_seconds(opens: int) -> float:
    return min(MAX_OPEN_SECONDS, OPEN_SECONDS * 2.0 ** max(0, opens - 1))
