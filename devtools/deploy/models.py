"""Which model versions to deploy, resolved against what a region offers at deploy time.

``infra/main.bicepparam`` names the deployments an organizer wants (``modelDeployments``:
deployment name, model, a version, SKU, capacity). Versions go stale within months, so
``devtools/deploy/command.py`` does not trust the file's version: it asks each region
(``az cognitiveservices model list -l REGION``, the REST ``Models - List`` of
``Microsoft.CognitiveServices/locations/models``) and picks, for each deployment, the newest
generally available version of that model that

- is offered for an ``OpenAI`` account with the deployment's SKU in every region deployed to;
- still takes new deployments on the event's last day (``until``): the SKU's
  ``deprecationDate``, else the model's ``deprecation.inference``, is later. Azure's
  "deprecation" is the day a version closes to new customers; a fresh subscription is one.

Nothing qualifies: :class:`NoDeployableVersion`, whose message names what the region offers
instead (the same kind of model: chat or embeddings). "Newest" is by the date Azure created
the version (``systemData.createdAt``): versions such as ``0613`` and ``0125`` do not sort as
strings.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

ACCOUNT_KIND = "OpenAI"  # infra/modules/openai.bicep
GENERALLY_AVAILABLE = {"GenerallyAvailable", "Stable"}
SUGGESTIONS = 6


class NoDeployableVersion(Exception):
    """No version of a requested model can be deployed for the event; the message says why and what can."""


@dataclass(frozen=True, slots=True)
class Offer:
    """One model version with one SKU, as a region lists it."""

    model: str
    version: str
    sku: str
    lifecycle: str
    created: str
    closes: date | None  # the day it stops taking new deployments; None: no date announced
    kind: str  # chat, embeddings or other, from the capabilities

    def open_on(self, day: date) -> bool:
        return self.lifecycle in GENERALLY_AVAILABLE and (self.closes is None or self.closes > day)

    def describe(self) -> str:
        until = f"new deployments until {self.closes}" if self.closes else "no closing date announced"
        return f"{self.model} {self.version} ({until})"


@dataclass(frozen=True, slots=True)
class Choice:
    """The version picked for one deployment, and why it differs from the file's, if it does."""

    deployment: dict[str, Any]
    offer: Offer
    asked: str

    def line(self) -> str:
        name, model = self.deployment["name"], self.offer.model
        picked = f"{model} {self.offer.version} {self.offer.sku}"
        closes = f"new deployments until {self.offer.closes}" if self.offer.closes else "no closing date announced"
        note = (
            ""
            if self.asked == self.offer.version
            else f"; main.bicepparam says {self.asked}, the newest that stays deployable is used"
        )
        return f"  {name}: {picked} ({closes}{note})"


def offers(listing: Iterable[Mapping[str, Any]]) -> list[Offer]:
    """Every (model, version, SKU) of an ``az cognitiveservices model list`` answer for an OpenAI account."""
    found = []
    for entry in listing:
        if entry.get("kind") != ACCOUNT_KIND:
            continue
        model = entry.get("model") or {}
        deprecation = (model.get("deprecation") or {}).get("inference")
        capabilities = model.get("capabilities") or {}
        kind = (
            "embeddings"
            if capabilities.get("embeddings") == "true"
            else "chat"
            if capabilities.get("chatCompletion") == "true"
            else "other"
        )
        created = str((model.get("systemData") or {}).get("createdAt") or "")
        for sku in model.get("skus") or []:
            closes = _day(sku.get("deprecationDate") or deprecation)
            found.append(
                Offer(
                    model=str(model.get("name")),
                    version=str(model.get("version")),
                    sku=str(sku.get("name")),
                    lifecycle=str(model.get("lifecycleStatus")),
                    created=created,
                    closes=closes,
                    kind=kind,
                )
            )
    return found


def choose(requested: Sequence[Mapping[str, Any]], regions: Mapping[str, Sequence[Offer]], until: date) -> list[Choice]:
    """The version to deploy for each requested deployment, open on ``until`` in every region."""
    choices = []
    for deployment in requested:
        model, sku = str(deployment["model"]), str(deployment["skuName"])
        per_region = [
            {o.version: o for o in offered if o.model == model and o.sku == sku and o.open_on(until)}
            for offered in regions.values()
        ]
        common = set.intersection(*(set(r) for r in per_region)) if per_region else set()
        if not common:
            raise NoDeployableVersion(_why(deployment, regions, until))
        # The earliest closing date over the regions is the one that counts.
        candidates = [min((r[v] for r in per_region), key=lambda o: o.closes or date.max) for v in common]
        best = max(candidates, key=lambda o: (o.created, o.version))
        choices.append(Choice(dict(deployment), best, str(deployment.get("version", ""))))
    return choices


def resolved(choices: Sequence[Choice]) -> list[dict[str, Any]]:
    """``modelDeployments`` for the template, with the versions picked."""
    return [{**c.deployment, "version": c.offer.version} for c in choices]


def _why(deployment: Mapping[str, Any], regions: Mapping[str, Sequence[Offer]], until: date) -> str:
    name, model, sku = deployment["name"], deployment["model"], deployment["skuName"]
    where = " and ".join(regions)
    lines = [f"deployment '{name}': no version of {model} as {sku} in {where} still takes new deployments on {until}."]
    for region, offered in regions.items():
        versions = [o for o in offered if o.model == model and o.sku == sku]
        if not versions:
            skus = sorted({o.sku for o in offered if o.model == model})
            lines.append(
                f"{region} offers {model} as {', '.join(skus)}, not {sku}."
                if skus
                else f"{region} does not offer {model}."
            )
        for offer in sorted(versions, key=lambda o: o.created):
            state = offer.lifecycle if offer.lifecycle not in GENERALLY_AVAILABLE else "generally available"
            lines.append(f"{region}: {model} {offer.version} is {state}, {_closing(offer)}.")
    kind = next((o.kind for offered in regions.values() for o in offered if o.model == model), "chat")
    instead = _instead(regions, sku, kind, until)
    if instead:
        lines.append(f"Offered instead ({kind}, {sku}, open on {until} in {where}), newest first:")
        lines += [f"  {offer.describe()}" for offer in instead]
    lines.append(
        "Set model and version of this deployment in infra/main.bicepparam (modelDeployments) to one of them, "
        "or give an earlier --until."
    )
    return "\n".join(lines)


def _instead(regions: Mapping[str, Sequence[Offer]], sku: str, kind: str, until: date) -> list[Offer]:
    per_region = [
        {(o.model, o.version): o for o in offered if o.sku == sku and o.kind == kind and o.open_on(until)}
        for offered in regions.values()
    ]
    common = set.intersection(*(set(r) for r in per_region)) if per_region else set()
    offers_ = sorted((per_region[0][key] for key in common), key=lambda o: (o.created, o.model), reverse=True)
    return offers_[:SUGGESTIONS]


def _closing(offer: Offer) -> str:
    return f"new deployments until {offer.closes}" if offer.closes else "no closing date announced"


def _day(value: Any) -> date | None:
    if not value:
        return None
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).date()


# main.bicepparam's literals: enough of Bicep's syntax for arrays of objects of strings,
# numbers and booleans, which is what modelDeployments and openAiExtraRegions hold.
_TOKEN = re.compile(r"\s*(?:(//[^\n]*)|('(?:[^'\\]|\\.)*')|(-?\d+)|(true|false|null)|([A-Za-z_]\w*)|([\[\]{}:,\n]))")


def parameter(text: str, name: str) -> Any:
    """The literal value ``main.bicepparam`` assigns to ``param NAME = ...``."""
    match = re.search(rf"^param\s+{re.escape(name)}\s*=\s*", text, re.MULTILINE)
    if match is None:
        raise KeyError(f"main.bicepparam does not set {name}")
    return _value(_tokens(text[match.end() :]))


def _tokens(text: str) -> list[tuple[str, str]]:
    """The tokens of one literal: up to its closing bracket, or the end of its line."""
    tokens: list[tuple[str, str]] = []
    depth, position = 0, 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise ValueError(f"not a literal: {text[position : position + 60]!r}")
        position = match.end()
        comment, string, number, constant, word, mark = match.groups()
        if comment or (mark == "\n" and depth > 0):
            continue
        if mark == "\n":
            break
        if string is not None:
            tokens.append(("string", string[1:-1].replace("\\'", "'")))
        elif number is not None:
            tokens.append(("number", number))
        elif constant is not None:
            tokens.append(("constant", constant))
        elif word is not None:
            if depth == 0:
                raise ValueError(f"not a literal: {text[:60]!r}")
            tokens.append(("word", word))
        else:
            depth += mark in "[{"
            depth -= mark in "]}"
            tokens.append(("mark", mark))
        if depth == 0:
            break
    return tokens


def _value(tokens: list[tuple[str, str]]) -> Any:
    kind, text = tokens.pop(0)
    if kind == "string":
        return text
    if kind == "number":
        return int(text)
    if kind == "constant":
        return {"true": True, "false": False, "null": None}[text]
    if text == "[":
        items = []
        while tokens[0] != ("mark", "]"):
            items.append(_value(tokens))
            if tokens[0] == ("mark", ","):
                tokens.pop(0)
        tokens.pop(0)
        return items
    if text == "{":
        fields: dict[str, Any] = {}
        while tokens[0] != ("mark", "}"):
            _, key = tokens.pop(0)
            assert tokens.pop(0) == ("mark", ":"), f"expected ':' after {key}"
            fields[key] = _value(tokens)
            if tokens[0] == ("mark", ","):
                tokens.pop(0)
        tokens.pop(0)
        return fields
    raise ValueError(f"not a literal: {text!r}")
