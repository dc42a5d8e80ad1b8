"""JSON Schema for the simulator: an instance that satisfies a schema, and the checks strict mode makes.

``instance(schema, hint)`` builds a JSON value valid under ``schema``, deterministically: the
arguments of a simulated tool call and the body of a structured answer. It covers what
function definitions and pydantic's ``model_json_schema()`` emit: ``type`` (one or a list),
``properties``/``required``/``additionalProperties``, ``enum``, ``const``, ``items`` and
``prefixItems`` with ``minItems``/``maxItems``/``uniqueItems``, string lengths and formats,
numeric bounds and ``multipleOf``, ``anyOf``/``oneOf``/``allOf``, and ``$ref`` into ``$defs`` or
``definitions`` (siblings of a ``$ref`` are merged in, as pydantic writes descriptions there).
Not covered: ``pattern`` (a string is not generated from a regular expression), ``not``,
``if``/``then``/``else``, ``dependentRequired``; such keywords are ignored.

``check(schema, name, strict)`` raises ``SchemaError`` for what OpenAI and Azure refuse with a
400: a schema that is not an object, a ``$ref`` to nothing, a recursion with no finite instance,
and, with ``strict``, an object without ``additionalProperties: false`` or one whose
``required`` does not list every property (messages worded as OpenAI's, e.g. "In context=(),
'additionalProperties' is required to be supplied and to be false.").
"""

from __future__ import annotations

import math
from typing import Any

MAX_DEPTH = 10  # OpenAI's structured outputs allow up to 10 levels of nesting
FORMATS = {
    "date-time": "2026-03-06T09:00:00Z",
    "date": "2026-03-06",
    "time": "09:00:00Z",
    "duration": "PT1H",
    "email": "alice@example.com",
    "hostname": "example.com",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
    "uri": "https://example.com/",
    "uuid": "7c9e6679-7425-40de-944b-e07fc1f90ae7",
}
WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")


class SchemaError(ValueError):
    """A schema OpenAI would refuse; the message says where and why."""


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def resolve(ref: str, root: dict[str, Any]) -> dict[str, Any]:
    """The schema a local ``$ref`` (``#``, ``#/$defs/X``, any JSON pointer) points at."""
    if not ref.startswith("#"):
        raise SchemaError(f"reference {ref!r} is not local: only references within the schema ('#/...') are supported")
    node: Any = root
    for part in [p for p in ref[1:].split("/") if p]:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            raise SchemaError(f"reference to component '{ref}' which was not found in the schema")
        node = node[part]
    if not isinstance(node, dict):
        raise SchemaError(f"reference to component '{ref}' is not a schema")
    return node


def _merged(schema: dict[str, Any], root: dict[str, Any], seen: int = 0) -> dict[str, Any]:
    """``schema`` with its ``$ref`` and single-schema ``allOf`` folded in."""
    if seen > MAX_DEPTH:
        raise SchemaError("references go more than 10 levels deep without reaching a schema")
    if "$ref" in schema:
        siblings = {k: v for k, v in schema.items() if k != "$ref"}
        return {**_merged(resolve(schema["$ref"], root), root, seen + 1), **siblings}
    if isinstance(schema.get("allOf"), list):
        merged = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            if isinstance(part, dict):
                part = _merged(part, root, seen + 1)
                properties = {**merged.get("properties", {}), **part.get("properties", {})}
                required = [*merged.get("required", []), *part.get("required", [])]
                merged = {**part, **merged, "properties": properties, "required": required}
        if not merged.get("properties"):
            merged.pop("properties", None)
        return merged
    return schema


class _Builder:
    def __init__(self, root: dict[str, Any], hint: str) -> None:
        self.root = root
        self.hint = hint
        self.active: list[str] = []  # the $refs being expanded: a recursion takes the way out

    def build(self, schema: Any, depth: int, variant: int) -> Any:
        if schema is True or schema == {} or not isinstance(schema, dict):
            return self.string({}, variant)
        if depth > MAX_DEPTH:
            raise SchemaError("the schema nests more than 10 levels deep, or recurses with no way to stop")
        ref = schema.get("$ref")
        if isinstance(ref, str):
            self.active.append(ref)
            try:
                return self.build({k: v for k, v in _merged(schema, self.root).items() if k != "$ref"}, depth, variant)
            finally:
                self.active.pop()
        schema = _merged(schema, self.root)
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return schema["enum"][variant % len(schema["enum"])]
        for key in ("anyOf", "oneOf"):
            options = schema.get(key)
            if isinstance(options, list) and options:
                return self.build(self.choose(options, depth), depth + 1, variant)
        kind = schema.get("type")
        if isinstance(kind, list):
            kinds = [k for k in kind if isinstance(k, str)]
            # Deep down, null ends a recursion; near the top, a real value says more.
            kind = (
                "null"
                if "null" in kinds and depth > MAX_DEPTH // 2
                else next((k for k in kinds if k != "null"), "null")
            )
        if kind is None:
            kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
        make = getattr(self, kind if kind in ("object", "array", "string", "integer", "number") else "other")
        return make(schema, depth, variant) if kind in ("object", "array") else make(schema, variant, kind)

    def choose(self, options: list[Any], depth: int) -> Any:
        """The first option that is not null, or, past half the depth, one that ends a recursion."""
        dicts = [o for o in options if isinstance(o, dict)]
        if not dicts:
            return {}
        dicts = [o for o in dicts if o.get("$ref") not in self.active] or dicts
        if depth > MAX_DEPTH // 2:
            for option in dicts:
                if option.get("type") == "null" or "$ref" not in option:
                    return option
        return next((o for o in dicts if o.get("type") != "null"), dicts[0])

    def object(self, schema: dict[str, Any], depth: int, variant: int) -> dict[str, Any]:
        found = schema.get("properties")
        properties: dict[str, Any] = found if isinstance(found, dict) else {}
        listed = schema.get("required")
        required = [r for r in listed if isinstance(r, str)] if isinstance(listed, list) else []
        names = [*properties] if depth <= MAX_DEPTH // 2 else [p for p in properties if p in required]
        extra = schema.get("additionalProperties")
        value = {name: self.build(properties[name], depth + 1, variant + i) for i, name in enumerate(names)}
        for name in required:
            if name not in value:
                value[name] = self.build(extra if isinstance(extra, dict) else {}, depth + 1, variant)
        wanted = schema.get("minProperties", 0)
        while isinstance(wanted, int) and len(value) < wanted and extra is not False:
            value[f"key{len(value)}"] = self.build(extra if isinstance(extra, dict) else {}, depth + 1, len(value))
        return value

    def array(self, schema: dict[str, Any], depth: int, variant: int) -> list[Any]:
        found = schema.get("prefixItems")
        prefix: list[Any] = found if isinstance(found, list) else []
        low = schema.get("minItems", 0) if isinstance(schema.get("minItems"), int) else 0
        high = schema.get("maxItems") if isinstance(schema.get("maxItems"), int) else None
        items = schema.get("items", {})
        recursive = isinstance(items, dict) and items.get("$ref") in self.active
        count = max(low, len(prefix), 1 if depth <= MAX_DEPTH // 2 and not recursive else 0)
        if high is not None:
            count = min(count, high)
        return [self.build(prefix[i] if i < len(prefix) else items, depth + 1, variant + i) for i in range(count)]

    def string(self, schema: dict[str, Any], variant: int, kind: str = "string") -> str:
        fmt = schema.get("format")
        if fmt in FORMATS:
            text = FORMATS[fmt]
            return text if not variant or fmt != "email" else f"user{variant}@example.com"
        text = self.hint if not variant else f"{self.hint} {WORDS[variant % len(WORDS)]}{variant}"
        low = schema.get("minLength", 0) if isinstance(schema.get("minLength"), int) else 0
        high = schema.get("maxLength") if isinstance(schema.get("maxLength"), int) else None
        if len(text) < low:
            text += "x" * (low - len(text))
        if high is not None and len(text) > high:
            # Keep what tells the variants apart (their tail) when the text must be cut short.
            text = text[-high:] if high else ""
        return text

    def integer(self, schema: dict[str, Any], variant: int, kind: str = "integer") -> int:
        return int(self.number(schema, variant, "integer"))

    def number(self, schema: dict[str, Any], variant: int, kind: str = "number") -> float | int:
        low, high = _bounds(schema, kind == "integer")
        step = schema.get("multipleOf")
        step = step if isinstance(step, int | float) and not isinstance(step, bool) and step > 0 else None
        if step and kind == "integer" and not float(step).is_integer():
            step = math.ceil(step)
        value: float = 1 + variant
        if low is not None and value < low:
            value = low
        if high is not None and value > high:
            value = high
        if step:
            fitted = math.ceil(value / step) * step
            value = fitted if high is None or fitted <= high else math.floor(high / step) * step
        return int(value) if kind == "integer" else value

    def other(self, schema: dict[str, Any], variant: int, kind: str) -> Any:
        return {"boolean": variant % 2 == 0, "null": None}.get(kind, self.hint)


def _bounds(schema: dict[str, Any], integer: bool) -> tuple[float | None, float | None]:
    def num(key: str) -> float | None:
        value = schema.get(key)
        return value if isinstance(value, int | float) and not isinstance(value, bool) else None

    low, high = num("minimum"), num("maximum")
    above, below = num("exclusiveMinimum"), num("exclusiveMaximum")
    if integer:
        if above is not None:
            low = max(low if low is not None else -math.inf, math.floor(above) + 1)
        if below is not None:
            high = min(high if high is not None else math.inf, math.ceil(below) - 1)
        low = math.ceil(low) if low is not None else None
        high = math.floor(high) if high is not None else None
    else:
        lower = max((x for x in (low, above) if x is not None), default=None)
        upper = min((x for x in (high, below) if x is not None), default=None)
        if above is not None:
            step = min(1, (upper - above) / 2) if upper is not None else 1
            low = max(low if low is not None else -math.inf, above + step)
        if below is not None:
            step = min(1, (below - lower) / 2) if lower is not None else 1
            high = min(high if high is not None else math.inf, below - step)
    return low, high


def instance(schema: Any, hint: str = "lorem ipsum") -> Any:
    """A JSON value valid under ``schema`` (strings say ``hint``); raises ``SchemaError``."""
    root = schema if isinstance(schema, dict) else {}
    return _Builder(root, hint).build(schema, 0, 0)


def check(schema: Any, name: str, strict: bool, what: str = "response_format") -> None:
    """Refuse, as OpenAI does, a schema it would not take (raises ``SchemaError``)."""
    prefix = f"Invalid schema for {what} '{name}'"
    if not isinstance(schema, dict):
        raise SchemaError(f"{prefix}: schema must be a JSON Schema object, got {_kind(schema)}.")
    try:
        instance(schema)
        if strict:
            _check_strict(schema, schema, (), set())
    except SchemaError as exc:
        text = str(exc)
        raise SchemaError(text if text.startswith("Invalid schema") else f"{prefix}: {text}.") from None
    except RecursionError:
        raise SchemaError(f"{prefix}: the schema nests too deeply.") from None


def _check_strict(schema: Any, root: dict[str, Any], context: tuple[str, ...], seen: set[str]) -> None:
    """Strict mode's rules: every object closed and every property required (OpenAI's wording)."""
    if not isinstance(schema, dict):
        return
    where = f"In context={context!r}"
    if "$ref" in schema:
        ref = schema["$ref"]
        if isinstance(ref, str) and ref not in seen:
            _check_strict(resolve(ref, root), root, context, seen | {ref})
        return
    if context == () and _merged(schema, root).get("type") != "object":
        raise SchemaError(f"schema must be a JSON Schema of 'type: \"object\"', got 'type: \"{schema.get('type')}\"'")
    if schema.get("type") == "object" or "properties" in schema:
        if schema.get("additionalProperties") is not False:
            raise SchemaError(f"{where}, 'additionalProperties' is required to be supplied and to be false")
        properties = schema.get("properties") or {}
        missing = [p for p in properties if p not in (schema.get("required") or [])]
        if missing:
            raise SchemaError(
                f"{where}, 'required' is required to be supplied and to be an array including every key in "
                f"properties. Missing '{missing[0]}'"
            )
        for key, sub in properties.items():
            _check_strict(sub, root, (*context, "properties", key), seen)
    for key in ("items",):
        if isinstance(schema.get(key), dict):
            _check_strict(schema[key], root, (*context, key), seen)
    for key in ("anyOf", "allOf"):
        for index, sub in enumerate(schema.get(key) or []):
            _check_strict(sub, root, (*context, key, str(index)), seen)
    for group in ("$defs", "definitions"):
        if context == () and isinstance(schema.get(group), dict):
            for key, sub in schema[group].items():
                _check_strict(sub, root, (group, key), seen | {f"#/{group}/{key}"})
