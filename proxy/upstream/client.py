"""Upstream Azure OpenAI: the pooled HTTP client, the backends' credentials, and the call with failover.

One transport per worker, a pool per origin (``proxy.upstream.transport``), serves every backend;
requests go to it straight, not through an ``httpx.AsyncClient``, whose URL and header merging,
cookie jar and redirect handling cost a tenth of the proxy's CPU and do nothing here (no cookies,
no redirects, one set of headers per call), nor as ``httpx.Request`` objects. A backend is called
with a bearer token from ``azure-identity`` (managed identity in Azure, developer credentials locally;
one token for all backends, cached by ``proxy.config.tokens``), or with its own key
when one is configured (``AZURE_OPENAI_API_KEY``, or a backend's
``api_key_setting``). Client headers are never forwarded: the attendee's
credential holds the event code.

``send`` tries the backends that serve the model in the order
``proxy.config.backends.Health`` gives (best priority first, by weight within it),
and moves on to the next on a 429 (cooling that backend down for its
``retry-after-ms`` / ``retry-after``), a 5xx, a connection failure or a
timeout, and on a 401, 403 or 404 (that backend's key, role or deployment is
wrong: logged, since the next one may well serve), all before anything reaches
the client: a response is returned only once a backend has answered with
something that is not one of those, so a stream that fails after its headers
ends with an error event instead (``proxy.edge.streaming``). Every attempt shares the request's time budget,
``UPSTREAM_TIMEOUT_SECONDS`` from the first. A stream's headers come with its
first event, so a stream waits for them at most half of what remains of the
budget while another backend is left to try, and fails over after that; a
request that is not streamed gets its headers only with the whole answer, so
it may use all that remains (cutting a long answer short to start it again
elsewhere would only waste the tokens), and a timeout fails over only if time
is left. With a single backend, connection failures and 502, 503 and 504 are
retried on it, up to ``CONNECT_ATTEMPTS`` sends in all.

When nothing succeeded: if any backend was throttled (now, or cooled down
before), the client gets 429 with the shortest wait among them, upstream's own
answer when one came (its ``retry-after`` headers set to that wait), else
``UpstreamThrottled``; otherwise the last failure, as before: a 5xx answer
(which ``proxy.edge.handlers`` turns into 502), ``UpstreamError`` (502) or
``UpstreamTimeout`` (504). Upstream's other answers (400: a bad request, a
content filter) pass through with their status and body from the first
backend, never tried elsewhere.

A refusal of the proxy itself is never passed on as it came: the attendee
would read upstream's 401 "invalid subscription key" as their own key being
wrong. A 401 or 403 (the app's key, identity or role), and a 404 from Azure's
routing (``DeploymentNotFound``, or ``"404"``: no such deployment or path, a
wrong endpoint or ``api-version``) become ``UpstreamError`` (502) with a
message for the organizer. On the deployment routes every 404 is of that kind
(the proxy chose the URL); on the v1 routes a 404 for an object (a stored
response upstream no longer has, OpenAI-shaped with no Azure code) is the
client's and passes through. ``raw=True`` (the organizer's probe) keeps
upstream's own answer.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable

import httpx
import orjson
import yarl
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import ClientAuthenticationError
from multidict import CIMultiDict

from proxy.config.backends import Backend, Health, Plan, retry_after_seconds
from proxy.config.settings import Settings
from proxy.config.tokens import BearerToken
from proxy.errors import ProxyError, UpstreamError, UpstreamThrottled, UpstreamTimeout
from proxy.upstream.transport import HttpTransport, UpstreamResponse

log = logging.getLogger("proxy.upstream")

SCOPE = "https://cognitiveservices.azure.com/.default"
CONNECT_ATTEMPTS = 3
RETRY_STATUSES = frozenset({502, 503, 504})
# A backend that refuses the proxy itself (key or role) or lacks the deployment: the next may serve.
MISCONFIGURED_STATUSES = frozenset({401, 403, 404})
# The codes of Azure's own 404s (routing), as opposed to OpenAI-shaped ones for an object (code null).
AZURE_NOT_FOUND_CODES = frozenset({"DeploymentNotFound", "404"})
MIN_ATTEMPT_SECONDS = 0.5  # less than this left of the budget: no further attempt
STREAM_WAIT_SHARE = 0.5  # of the budget left, what a stream waits for its headers while another backend remains
_URLS_KEPT = 1_000  # parsed upstream URLs kept per worker (stored responses' ids make some unique)


class UpstreamAuth:
    """The header that authenticates the proxy to one backend: its key, or the shared bearer token."""

    def __init__(self, api_key: str | None, token: BearerToken | None) -> None:
        if api_key is None and token is None:
            raise ValueError("either an API key or a credential is needed for upstream")
        self._api_key = api_key
        self._token = token

    async def header(self) -> tuple[str, str]:
        if self._api_key is not None:
            return ("api-key", self._api_key)
        assert self._token is not None
        try:
            return ("authorization", await self._token.value())
        except ClientAuthenticationError as exc:
            raise UpstreamError(
                "The proxy could not get a token for Azure OpenAI (managed identity); "
                "the operator should check the app's identity and role assignment."
            ) from exc


class Upstream:
    """Sends a prepared body to a model's backends and returns the first usable (streaming) response."""

    def __init__(
        self,
        settings: Settings,
        transport: HttpTransport,
        credential: AsyncTokenCredential | None,
        health: Health | None = None,
    ) -> None:
        if not settings.backends:
            raise ValueError("no upstream backend is configured")
        token = None if credential is None else BearerToken(credential, SCOPE)
        self.backends = settings.backends
        self.health = health or Health()
        self._auth = {backend.name: UpstreamAuth(backend.api_key, token) for backend in self.backends}
        self._query = f"?api-version={settings.openai_api_version}"
        self._budget = settings.upstream_timeout_seconds
        self._transport = transport
        self._urls: dict[str, yarl.URL] = {}
        # Stored responses live on the resource that made them: the Responses API uses one backend.
        self._primary = min(self.backends, key=lambda backend: (backend.priority, -backend.weight))

    @staticmethod
    def transport(settings: Settings) -> HttpTransport:
        return HttpTransport(connect_timeout=10.0, read_timeout=settings.upstream_timeout_seconds)

    def serving(self, model: str) -> list[Backend]:
        """The backends that serve ``model``, in configuration order."""
        return [backend for backend in self.backends if backend.deployment(model) is not None]

    async def send(
        self,
        deployment: str,
        operation: str,
        body: bytes,
        request_id: str,
        *,
        stream: bool = False,
        only: Backend | None = None,
        raw: bool = False,
    ) -> UpstreamResponse:
        """POST to a backend serving the model ``deployment``; the caller reads or streams the response and closes it.

        The response names the backend (``backend``) and counts the sends
        (``attempts``). ``only``: that backend and no
        other, whatever its health; ``raw``: a refusal of the proxy comes back
        as upstream sent it (``proxy.manage.probe`` checks each backend with both).
        """

        def url(backend: Backend) -> str:
            return f"{backend.endpoint}/openai/deployments/{backend.deployment(deployment)}/{operation}{self._query}"

        plan = self.health.plan(self.backends, deployment) if only is None else Plan([only], [])
        wait_share = STREAM_WAIT_SHARE if stream else 1.0
        return await self._route(
            plan,
            deployment,
            "POST",
            url,
            body,
            request_id,
            wait_share=wait_share,
            misconfigured=MISCONFIGURED_STATUSES,
            raw=raw,
        )

    def responses_deployment(self, model: str) -> str | None:
        """The deployment that serves ``model`` on the Responses API's backend, or None if it has none."""
        return self._primary.deployment(model)

    async def send_v1(
        self,
        method: str,
        path: str,
        request_id: str,
        *,
        body: bytes | None = None,
        query: list[tuple[str, str]] | None = None,
        label: str = "the Responses API",
    ) -> UpstreamResponse:
        """Call Azure OpenAI's v1 API, ``/openai/v1/<path>`` (the Responses API); ``label`` names it in errors.

        Always on the first backend (best priority, then weight): a stored
        response, and a chain through ``previous_response_id``, exist only on
        the resource that made them, so there is nothing to fail over to.
        The v1 API takes no dated ``api-version``, so ``AZURE_OPENAI_API_VERSION``
        does not apply here. Source:
        https://learn.microsoft.com/en-us/azure/foundry/openai/api-version-lifecycle
        """

        def url(backend: Backend) -> str:
            return str(httpx.URL(f"{backend.endpoint}/openai/v1/{path}", params=query or None))

        # Not self.health.plan(): it keeps the backends that list a model among their deployments, and
        # none lists "responses". There is nothing to fail over to: the one backend is always tried.
        plan = Plan([self._primary], [])
        return await self._route(plan, label, method, url, body, request_id, model="responses")

    async def _route(
        self,
        plan: Plan,
        label: str,
        method: str,
        url: Callable[[Backend], str],
        body: bytes | None,
        request_id: str,
        model: str | None = None,
        wait_share: float = 1.0,
        misconfigured: frozenset[int] = frozenset(),
        raw: bool = False,
    ) -> UpstreamResponse:
        model = model or label
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._budget
        if not plan.order and not plan.cooled:
            raise UpstreamError(f"No backend in AZURE_OPENAI_BACKENDS serves '{label}'; the operator should add it.")
        queue = list(plan.order)
        retry: list[Backend] = []  # failed in a way that may pass on the same backend
        throttled: tuple[float, UpstreamResponse, Backend] | None = None  # the 429 with the shortest wait
        shortest = plan.cooled[0][0] if plan.cooled else math.inf
        failure: ProxyError | tuple[UpstreamResponse, Backend] | None = None
        attempts = 0
        while attempts < max(CONNECT_ATTEMPTS, len(plan.order)):
            if not queue:
                if not retry:
                    break
                queue, retry = retry, []
                await asyncio.sleep(0.1 * attempts)
            remaining = deadline - loop.time()
            if attempts and remaining < MIN_ATTEMPT_SECONDS:
                break
            backend = queue.pop(0)
            # Another request may have found it throttled since this one was planned: with others
            # to choose from, it is not called (a lone backend, the Responses API's, always is).
            cooled = self.health.cooled_for(backend, model) if len(plan.order) + len(plan.cooled) > 1 else 0.0
            if cooled:
                shortest = min(shortest, cooled)
                continue
            attempts += 1
            self.health.attempting(backend, model)
            wait = remaining * wait_share if queue else remaining  # leave time for the next backend
            try:
                response = await self._attempt(backend, method, url(backend), body, request_id, wait)
            except (httpx.TimeoutException, TimeoutError) as exc:
                self.health.failed(backend, model)
                if isinstance(exc, httpx.ConnectTimeout):
                    retry.append(backend)
                failure = _chained(
                    UpstreamTimeout(
                        f"Azure OpenAI did not answer within the proxy's time limit for '{label}'. Try again."
                    ),
                    exc,
                )
                continue
            except httpx.TransportError as exc:
                self.health.failed(backend, model)
                retry.append(backend)
                failure = _chained(
                    UpstreamError(f"Azure OpenAI could not be reached for '{label}' after {attempts} attempts."), exc
                )
                continue
            status = response.status_code
            if status == 429:
                wait = retry_after_seconds(response.headers)
                self.health.throttled(backend, model, wait)
                shortest = min(shortest, wait)
                if throttled is None or wait < throttled[0]:
                    throttled = (wait, await _buffered(response), backend)
                else:
                    await response.aclose()
                continue
            if status >= 500 or status in misconfigured:
                self.health.failed(backend, model)
                if status < 500:
                    log.warning(
                        "backend '%s' answered %d for '%s': check its deployments and the app's role on it "
                        "(request %s)",
                        backend.name,
                        status,
                        label,
                        request_id,
                    )
                if status in RETRY_STATUSES:
                    retry.append(backend)
                failure = (await _buffered(response), backend)  # read now: nothing stays open meanwhile
                continue
            if status in MISCONFIGURED_STATUSES and not raw:  # only the v1 routes get here with these
                response = await _buffered(response)
                if _refuses_the_proxy(response):
                    raise _refusal(response, backend, label)
            self.health.succeeded(backend, model)
            return _answered(response, backend, attempts)
        if shortest < math.inf:
            if throttled is None:
                seconds = math.ceil(shortest)
                raise UpstreamThrottled(
                    f"Every Azure OpenAI backend for '{label}' is at its quota right now; retry after {seconds} s.",
                    retry_after=shortest,
                )
            _, response, backend = throttled
            headers = CIMultiDict(response.headers)
            headers["retry-after"] = str(max(1, math.ceil(shortest)))
            headers["retry-after-ms"] = str(max(1, math.ceil(shortest * 1000)))
            return _answered(UpstreamResponse(429, headers, content=response.content), backend, attempts)
        if isinstance(failure, tuple):
            response, backend = failure
            if response.status_code in misconfigured and not raw:
                raise _refusal(response, backend, label)
            return _answered(response, backend, attempts)
        assert failure is not None  # the first attempt is always made
        raise failure

    async def _attempt(
        self, backend: Backend, method: str, url: str, body: bytes | None, request_id: str, seconds: float
    ) -> UpstreamResponse:
        name, value = await self._auth[backend.name].header()
        headers = {"accept-encoding": "identity", "x-ms-client-request-id": request_id, name: value}
        if body is not None:
            headers["content-type"] = "application/json"
        target = self._urls.get(url)
        if target is None:  # parsed once: a handful of URLs (backend, model, operation) carry nearly every call
            if len(self._urls) > _URLS_KEPT:
                self._urls.clear()
            target = self._urls[url] = yarl.URL(str(httpx.URL(url)), encoded=True)  # parsed once, not per call
        async with asyncio.timeout(seconds):
            return await self._transport.send(method, target, headers, body)  # its body streamed, as it arrives

    async def aclose(self) -> None:
        await self._transport.aclose()


def _answered(response: UpstreamResponse, backend: Backend, attempts: int) -> UpstreamResponse:
    response.backend = backend.name  # recorded in usage
    response.attempts = attempts  # named in a 502's message
    return response


def _azure_code(response: UpstreamResponse) -> str | None:
    try:
        error = orjson.loads(response.content).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


def _refuses_the_proxy(response: UpstreamResponse) -> bool:
    """A 401 or 403, or a 404 from Azure's routing rather than for an object (a buffered response)."""
    if response.status_code in (401, 403):
        return True
    return response.status_code == 404 and _azure_code(response) in AZURE_NOT_FOUND_CODES


def _refusal(response: UpstreamResponse, backend: Backend, label: str) -> UpstreamError:
    """The 502 an attendee gets when upstream refused the proxy itself: it says so, for the organizer."""
    status, code = response.status_code, _azure_code(response)
    seen = f"{status} {code}" if code and code != str(status) else str(status)
    if status == 404:
        fix = (
            f"has no deployment for '{label}' (or the endpoint or api-version is wrong); the organizer should "
            "deploy it, or remove it from the event's models"
        )
    else:
        fix = (
            "refused the proxy's own credentials; the organizer should check the app's identity and its "
            "Cognitive Services OpenAI User role on that resource (or the backend's API key)"
        )
    return UpstreamError(
        f"Azure OpenAI backend '{backend.name}' {fix} ({seen}, run 'python -m proxy.manage doctor'). "
        "Your own key is fine."
    )


def _chained(error: ProxyError, cause: BaseException) -> ProxyError:
    error.__cause__ = cause
    return error


async def read_answer(response: UpstreamResponse) -> bytes:
    """An answer's whole body, closed after; a timeout or a broken read becomes the proxy's own error."""
    try:
        return await response.aread()
    except httpx.TimeoutException as exc:
        raise UpstreamTimeout("Azure OpenAI did not finish its answer within the proxy's time limit.") from exc
    except httpx.HTTPError as exc:
        raise UpstreamError("The answer from Azure OpenAI broke off; try again.") from exc
    finally:
        await response.aclose()


async def _buffered(response: UpstreamResponse) -> UpstreamResponse:
    """A refusal (429, 5xx) read in full now, so it can be passed on after other backends were tried."""
    try:
        content = await response.aread()
    except httpx.HTTPError:  # its status and headers are what matter
        content = b""
    finally:
        await response.aclose()
    return UpstreamResponse(response.status_code, response.headers, content=content)
