"""``python -m proxy.manage doctor``: is the proxy ready for an event? One line per finding.

It talks to a running proxy over HTTP only, as an organizer would, so the same
check works against ``make run`` (default ``http://localhost:7071``) and against
a deployed app (``--url https://NAME.azurewebsites.net``, which
``devtools/deploy/command.py`` passes after a deployment):

1. ``GET /api/health``: the app answers and reaches its Table Storage with its
   own identity (managed identity in Azure, Azurite locally).
2. ``GET /api/manage/events``: the organizer key (``ORGANIZER_KEY``, from the
   environment or ``local.settings.json``) is accepted.
3. For the event given with ``--event``, or else (without ``--models``) every event
   that has not ended: its window and caps, summarised, and whether it is switched on.
4. ``POST /api/manage/probe``: every model the event allows (and every name given
   with ``--models``) answers a one-token request through the proxy, with the
   app's identity and upstream, without opening the event to attendees and
   without touching anyone's caps or usage (``proxy.manage.probe``). A model that refuses
   the token-limit field the proxy sets on requests that name none (asked of
   ``proxy.upstream.payload`` itself, not written down here) is a problem; one that refuses
   only the other field is a note.

Each finding is one line: ``ok``, ``info``, or ``PROBLEM`` followed by what to do.
The exit code is 0 when there is no problem, 1 otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import orjson

from proxy.upstream.payload import prepare_chat

DEFAULT_URL = "http://localhost:7071"
TOKEN_FIELDS = ("max_completion_tokens", "max_tokens")
TIMEOUT_SECONDS = 60.0
_LABELS = {"ok": "ok     ", "info": "info   ", "problem": "PROBLEM"}


@dataclass(frozen=True, slots=True)
class Finding:
    """One line of the report: its kind (ok, info, problem), what was found, what to do."""

    kind: str
    text: str
    fix: str = ""

    def line(self) -> str:
        fix = f" -> {self.fix}" if self.fix else ""
        return f"{_LABELS[self.kind]}  {self.text}{fix}"


class _Stop(Exception):
    """A finding after which nothing further can be checked."""

    def __init__(self, finding: Finding) -> None:
        super().__init__(finding.text)
        self.finding = finding


def diagnose(
    client: httpx.Client,
    url: str,
    organizer_key: str | None,
    event_id: str | None = None,
    models: Sequence[str] = (),
    now: datetime | None = None,
) -> list[Finding]:
    """Every finding about the proxy at ``url`` (no ``/api``), in the order checked."""
    findings: list[Finding] = []
    try:
        for finding in _checks(client, url.rstrip("/"), organizer_key, event_id, models, now or datetime.now(UTC)):
            findings.append(finding)
    except _Stop as stop:
        findings.append(stop.finding)
    return findings


def _checks(
    client: httpx.Client,
    url: str,
    key: str | None,
    event_id: str | None,
    models: Sequence[str],
    now: datetime,
) -> Iterator[Finding]:
    yield _health(client, url)
    if not key:
        raise _Stop(
            Finding(
                "problem",
                "no organizer key to check events and models with",
                "set ORGANIZER_KEY (the app setting of that name; 'make run' prints it) and run doctor again",
            )
        )
    headers = {"authorization": f"Bearer {key}"}
    listing = _get(client, f"{url}/api/manage/events", headers)
    yield _key_finding(listing, url)
    if event_id is not None:
        answer = _get(client, f"{url}/api/manage/events/{event_id}", headers)
        if answer.status_code == 404:
            raise _Stop(
                Finding("problem", f"no event with id '{event_id}'", "list them: python -m proxy.manage events list")
            )
        _expect_ok(answer, "reading the event")
        events = [answer.json()]
    elif models:
        events = []  # deployments by name, as devtools/deploy/command.py asks after a deployment
    else:
        events = [e for e in listing.json()["data"] if _parse(e["end"]) > now]
        if not events:
            yield Finding(
                "info",
                "no event that has not ended, so no model was probed",
                "create one (python -m proxy.manage events create --help), then run doctor --event ID",
            )
    for event in events:
        yield from _event_findings(event, now)
        yield from _probe(client, url, headers, {"event": event["id"]}, f"event {event['id']}")
    if models:
        yield from _probe(client, url, headers, {"models": list(models)}, "deployment")


def _health(client: httpx.Client, url: str) -> Finding:
    try:
        answer = client.get(f"{url}/api/health")
    except httpx.HTTPError as exc:
        raise _Stop(
            Finding(
                "problem",
                f"the proxy does not answer at {url} ({type(exc).__name__})",
                "start it with 'make run', or pass the deployed app's URL with --url",
            )
        ) from exc
    body = _json(answer)
    if answer.status_code == 200 and body.get("storage") == "ok":
        return Finding("ok", f"health: {url} answers and reaches its Table Storage")
    if answer.status_code == 503:
        raise _Stop(
            Finding(
                "problem",
                "the proxy cannot reach its Table Storage (health says storage unreachable)",
                "locally: is Azurite running ('make run' starts it)? In Azure: the app's identity needs "
                "Storage Table Data Contributor on the account (a new role assignment takes a few minutes)",
            )
        )
    raise _Stop(
        Finding(
            "problem",
            f"health answered {answer.status_code} at {url}/api/health",
            "check that --url points at this proxy (no /api at the end)",
        )
    )


def _key_finding(answer: httpx.Response, url: str) -> Finding:
    if answer.status_code == 401:
        raise _Stop(
            Finding(
                "problem",
                f"the organizer key is refused by {url}",
                "use the ORGANIZER_KEY the app runs with (in Azure: az functionapp config appsettings list "
                "-g RG -n APP --query \"[?name=='ORGANIZER_KEY'].value\" -o tsv)",
            )
        )
    if answer.status_code == 503 and _json(answer).get("error", {}).get("code") == "organizer_api_disabled":
        raise _Stop(
            Finding("problem", "the organizer API is off on this app", "set the ORGANIZER_KEY app setting and restart")
        )
    _expect_ok(answer, "listing events")
    return Finding("ok", f"organizer key accepted; {len(answer.json()['data'])} event(s) stored")


def _event_findings(event: dict[str, Any], now: datetime) -> Iterator[Finding]:
    start, end = _parse(event["start"]), _parse(event["end"])
    zone = ZoneInfo(event["time_zone"])
    window = f"{start.astimezone(zone):%Y-%m-%d %H:%M} to {end.astimezone(zone):%Y-%m-%d %H:%M} {event['time_zone']}"
    state = "open now" if start <= now < end else ("ended" if now >= end else f"opens in {_until(now, start)}")
    caps = _caps(event)
    models = ", ".join(event["models"]) or "none"
    yield Finding("info", f"event {event['id']} '{event['name']}': {state}, {window}; models {models}; {caps}")
    if not event["active"]:
        yield Finding(
            "problem",
            f"event {event['id']} is switched off: attendees get event_disabled",
            f"python -m proxy.manage events enable {event['id']}",
        )
    if not event["models"]:
        yield Finding(
            "problem",
            f"event {event['id']} allows no model",
            f"python -m proxy.manage events update {event['id']} --models NAME1,NAME2",
        )


def _caps(event: dict[str, Any]) -> str:
    def cap(name: str, label: str) -> str | None:
        value = event.get(name)
        return None if value is None else f"{label} {value}"

    parts = [
        cap("max_tokens", "max_tokens"),
        cap("daily_requests", "requests/attendee/day"),
        cap("daily_tokens", "tokens/attendee/day"),
        cap("tpm", "tokens/attendee/minute"),
        cap("event_requests", "requests for the event"),
        cap("event_tokens", "tokens for the event"),
        cap("max_attendees", "attendees at most"),
    ]
    return "caps: " + (", ".join(p for p in parts if p) or "none")


def _probe(
    client: httpx.Client, url: str, headers: dict[str, str], body: dict[str, Any], owner: str
) -> Iterator[Finding]:
    answer = client.post(f"{url}/api/manage/probe", headers=headers, json=body)
    _expect_ok(answer, "probing the models")
    results = answer.json()["results"]
    backends: dict[str, int] = {}
    for result in results:
        backends[result["model"]] = backends.get(result["model"], 0) + 1
    for result in results:
        model = result["model"]
        if backends[model] > 1 and result.get("backend"):
            model = f"{model} on backend {result['backend']}"  # each backend probed on its own
        if result["ok"]:
            yield Finding("ok", f"{owner}: {model} answers ({result['operation']}, {result['latency_ms']} ms)")
            yield from _token_field_findings(result, owner, model)
        else:
            yield Finding("problem", f"{owner}: {model} does not answer: {_why(result)}", _model_fix(result, owner))


def capping_field() -> str:
    """The field the proxy sets on a chat request that names neither, asked of the proxy's own code."""
    prepared = prepare_chat({"messages": [{"role": "user", "content": "ok"}]}, 1, "doctor")
    body = orjson.loads(prepared.body)
    return next(field for field in TOKEN_FIELDS if field in body)


def _token_field_findings(result: dict[str, Any], owner: str, model: str) -> Iterator[Finding]:
    """A model that refuses the field the proxy sets is a problem; one the proxy never sends, a note."""
    proxy_sets = capping_field()
    for field in TOKEN_FIELDS:
        if not result.get(f"refuses_{field}"):
            continue
        other = next(f for f in TOKEN_FIELDS if f != field)
        if field == proxy_sets:
            yield Finding(
                "problem",
                f"{owner}: {model} refuses {field}, which the proxy sets when a request names neither "
                f"{field} nor {other}",
                f"tell attendees to send {other} with this model, or allow a model that takes {field}",
            )
        else:
            yield Finding(
                "info",
                f"{owner}: {model} refuses {field}; the proxy caps requests with {proxy_sets}, so only a client "
                f"that sends {field} itself is refused (Azure's 400 names the fix: {other})",
            )


def _why(result: dict[str, Any]) -> str:
    code = f" {result['error_code']}" if result.get("error_code") else ""
    return f"{result['status']}{code}, {result['error']}"


def _model_fix(result: dict[str, Any], owner: str) -> str:
    status, model = result["status"], result["model"]
    if status == 404:
        fix = f"deploy '{model}' (modelDeployments in infra/main.bicepparam, then redeploy)"
        if owner.startswith("event "):
            event_id = owner.removeprefix("event ")
            fix += f", or drop it: python -m proxy.manage events update {event_id} --models ..."
        return fix
    if status in (401, 403):
        return "the app's identity needs Cognitive Services OpenAI User on the Azure OpenAI account"
    if status == 429:
        return "the deployment is out of quota: raise its capacity (thousands of tokens per minute)"
    return "see the error above; az cognitiveservices account deployment list -g RG -n ACCOUNT shows the deployments"


def _get(client: httpx.Client, url: str, headers: dict[str, str]) -> httpx.Response:
    try:
        return client.get(url, headers=headers)
    except httpx.HTTPError as exc:
        raise _Stop(Finding("problem", f"{url} did not answer ({type(exc).__name__})", "run doctor again")) from exc


def _expect_ok(answer: httpx.Response, doing: str) -> None:
    if answer.status_code != 200:
        error = _json(answer).get("error", {})
        message = error.get("message") if isinstance(error, dict) else None
        raise _Stop(
            Finding(
                "problem",
                f"{doing} answered {answer.status_code}: {message or answer.text[:200]}",
                "see the app's log (request id in the x-request-id header)",
            )
        )


def _json(answer: httpx.Response) -> dict[str, Any]:
    try:
        body = answer.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _parse(moment: str) -> datetime:
    return datetime.fromisoformat(moment)


def _until(now: datetime, moment: datetime) -> str:
    minutes = int((moment - now).total_seconds() // 60)
    if minutes < 120:
        return f"{minutes} min"
    if minutes < 48 * 60:
        return f"{minutes // 60} h"
    return f"{minutes // (24 * 60)} days"


def run(url: str, organizer_key: str | None, event_id: str | None, models: Sequence[str]) -> int:
    """Print the report; 0 when nothing is wrong."""
    print(f"doctor: {url}")
    with httpx.Client(timeout=TIMEOUT_SECONDS) as client:
        findings = diagnose(client, url, organizer_key, event_id, models)
    for finding in findings:
        print(finding.line())
    problems = sum(1 for f in findings if f.kind == "problem")
    print("All good." if not problems else f"{problems} problem(s).")
    return 1 if problems else 0
