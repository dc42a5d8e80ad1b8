"""Prices per model, and what a request costs.

The table is ``proxy/data/prices.json``: USD per million tokens for input,
cached input and output, each model with the source and date of its price
(Azure's retail prices, Global Standard). ``MODEL_PRICES`` (``proxy.config.settings``)
overrides or adds prices by *deployment* name, in the same units:
``{"gpt-4o-mini": {"input": 0.15, "cached_input": 0.075, "output": 0.6}}``.

Which price a request pays, in this order: ``MODEL_PRICES`` for its
deployment; the table for the model upstream's answer names
(``gpt-4o-mini-2024-07-18``, looked up as is, then without its version
date); the table for the deployment name, the same way. A request none of
these prices is counted with cost 0 and *flagged* (``unpriced`` in the
usage figures, a warning in the log once per model and worker), never
silently priced at 0. An event that caps cost cannot count such a request,
so it refuses a deployment this table does not price by its name (``known``)
before upstream: ``403 model_price_unknown`` (``proxy.edge.handlers``).

Costs are kept as whole nano-dollars (1e-9 USD): a prompt token of
text-embedding-3-small costs 20 of them, so sums are exact integers, and the
reports turn them into USD numbers at the end (``usd``).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger("proxy.prices")

PRICES_FILE = Path(__file__).parent.parent / "data" / "prices.json"
NANOS_PER_USD = 1_000_000_000
_VERSION_DATE = re.compile(r"-\d{4}-\d{2}-\d{2}$")


class Price(BaseModel):
    """USD per million tokens; ``cached_input`` defaults to ``input`` (no discount)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cached_input: float | None = Field(None, ge=0)

    def cost_nanos(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> int:
        """What these tokens cost, in nano-dollars (cached tokens are part of the prompt)."""
        cached = min(max(cached_tokens, 0), prompt_tokens)
        cached_price = self.input if self.cached_input is None else self.cached_input
        # A price per million tokens is a price in milli-nano-dollars per token: x1000.
        return round(
            (prompt_tokens - cached) * self.input * 1000
            + cached * cached_price * 1000
            + completion_tokens * self.output * 1000
        )


@dataclass(frozen=True, slots=True)
class Priced:
    """One request's price: the model it was priced as ("" when none), and its cost."""

    model: str
    cost_nanos: int

    @property
    def unpriced(self) -> bool:
        return not self.model


class PriceTable:
    """The sourced table plus ``MODEL_PRICES``; one per worker."""

    def __init__(self, table: Mapping[str, Price], overrides: Mapping[str, Price] | None = None) -> None:
        self._table = dict(table)
        self._overrides = dict(overrides or {})
        self._warned: set[str] = set()

    @classmethod
    def load(cls, overrides: Mapping[str, Price] | None = None, path: Path = PRICES_FILE) -> PriceTable:
        data = json.loads(path.read_text())
        table = {name: Price.model_validate(_prices_only(entry)) for name, entry in data["models"].items()}
        return cls(table, overrides)

    def find(self, upstream_model: str, deployment: str) -> tuple[str, Price] | None:
        """(the name it is priced as, its price), or None when nothing prices it."""
        if deployment in self._overrides:
            return deployment, self._overrides[deployment]
        for name in (upstream_model, deployment):
            for candidate in (name, _VERSION_DATE.sub("", name)):
                if candidate and candidate in self._table:
                    return candidate, self._table[candidate]
        return None

    def price(
        self, upstream_model: str, deployment: str, prompt_tokens: int, cached_tokens: int, completion_tokens: int
    ) -> Priced:
        found = self.find(upstream_model, deployment)
        if found is None:
            name = upstream_model or deployment
            if name not in self._warned:
                self._warned.add(name)
                log.warning(
                    "no price for model %r (deployment %r): its requests are counted as unpriced; "
                    "add it to MODEL_PRICES",
                    name,
                    deployment,
                )
            return Priced("", 0)
        name, price = found
        return Priced(name, price.cost_nanos(prompt_tokens, cached_tokens, completion_tokens))

    def known(self, deployment: str) -> Price | None:
        """The price a deployment's requests pay when upstream names no model (plans, estimates)."""
        found = self.find("", deployment)
        return None if found is None else found[1]


def usd(nanos: int | float) -> float:
    """Nano-dollars as a USD number (rounded to the nano-dollar)."""
    return round(nanos / NANOS_PER_USD, 9)


def parse_model_prices(raw: str) -> dict[str, Price]:
    """``MODEL_PRICES``: a JSON object of deployment name -> price; ValueError naming what is wrong."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError('must be a JSON object, e.g. {"gpt-4o-mini": {"input": 0.15, "output": 0.6}}')
    prices: dict[str, Price] = {}
    for name, entry in data.items():
        if not isinstance(entry, dict):
            raise ValueError(f"'{name}' must be an object with input, output and optionally cached_input")
        try:
            prices[name] = Price.model_validate(entry)
        except ValidationError as exc:
            error = exc.errors(include_url=False)[0]
            field = ".".join(str(part) for part in error["loc"])
            raise ValueError(f"'{name}': {field}: {error['msg']} (USD per million tokens)") from None
    return prices


def _prices_only(entry: Mapping[str, object]) -> dict[str, object]:
    return {key: entry[key] for key in ("input", "cached_input", "output") if key in entry}
