"""Evaluate a Bicep file's variables and outputs for given parameters, as Azure Resource Manager would.

Enough of the language for expressions over parameters (no resources): literals, interpolated
strings, arrays, objects, member and index access, ``! && || == != < > ?: ??``, lambdas, and the
functions listed in ``FUNCTIONS``. ``fail(message)`` raises :class:`DeploymentFailed` with the
message, as a deployment stops with it. Used by the tests to show what ``infra/modules/checks.bicep``
refuses, with its own expressions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from itertools import chain
from typing import Any

from devtools.deploy.bicep_parse import BicepFile, Node


class DeploymentFailed(Exception):
    """``fail()`` was reached: the deployment stops with this message."""


def _union(*values: Any) -> Any:
    if all(isinstance(v, dict) for v in values):
        return {k: v for value in values for k, v in value.items()}
    seen: list[Any] = []  # duplicates are kept once, those within one array too (ARM's union)
    for value in values:
        for item in value:
            if item not in seen:
                seen.append(item)
    return seen


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "empty": lambda v: v is None or len(v) == 0,
    "length": len,
    "toLower": lambda s: s.lower(),
    "toUpper": lambda s: s.upper(),
    "trim": lambda s: s.strip(),
    "split": lambda s, sep: s.split(sep),
    "join": lambda items, sep: sep.join(items),
    "contains": lambda container, item: item in container,
    "union": _union,
    "concat": lambda *values: "".join(values) if all(isinstance(v, str) for v in values) else list(chain(*values)),
    "string": lambda v: v if isinstance(v, str) else json.dumps(v, separators=(",", ":")),
    "take": lambda v, n: v[:n],
}


def evaluate(file: BicepFile, parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The file's outputs (and variables), or :class:`DeploymentFailed` from the first ``fail()`` reached."""
    scope: dict[str, Any] = {}
    for declaration in file.declarations:
        if declaration.kind == "param":
            if declaration.name in parameters:
                scope[declaration.name] = parameters[declaration.name]
            elif declaration.value is not None:
                scope[declaration.name] = _eval(declaration.value, scope)
            else:
                raise KeyError(f"parameter '{declaration.name}' is required")
    outputs = {}
    for declaration in file.declarations:
        if declaration.kind == "var" and declaration.value is not None:
            scope[declaration.name] = _eval(declaration.value, scope)
        elif declaration.kind == "output" and declaration.value is not None:
            outputs[declaration.name] = _eval(declaration.value, scope)
    return outputs


def _eval(node: Node, scope: Mapping[str, Any]) -> Any:
    kind = node.kind
    if kind == "literal":
        return node.value
    if kind == "name":
        return scope[node.value]
    if kind == "string":
        return "".join(p if isinstance(p, str) else _text(_eval(p, scope)) for p in node.parts)
    if kind == "array":
        return [_eval(item, scope) for item in node.parts]
    if kind == "object":
        return {key: _eval(value, scope) for key, _, value in node.parts}
    if kind == "member":
        return _eval(node.parts[0], scope)[node.value]
    if kind == "index":
        return _eval(node.parts[0], scope)[_eval(node.parts[1], scope)]
    if kind == "unary":
        value = _eval(node.parts[0], scope)
        return (not value) if node.value == "!" else -value
    if kind == "ternary":
        condition, yes, no = node.parts
        return _eval(yes, scope) if _eval(condition, scope) else _eval(no, scope)
    if kind == "binary":
        left = _eval(node.parts[0], scope)
        if node.value == "&&":
            return left and _eval(node.parts[1], scope)
        if node.value == "||":
            return left or _eval(node.parts[1], scope)
        if node.value == "??":
            return left if left is not None else _eval(node.parts[1], scope)
        right = _eval(node.parts[1], scope)
        operations: dict[str, Callable[[Any, Any], Any]] = {
            "==": lambda a, b: a == b,
            "!=": lambda a, b: a != b,
            "<": lambda a, b: a < b,
            ">": lambda a, b: a > b,
            "<=": lambda a, b: a <= b,
            ">=": lambda a, b: a >= b,
            "+": lambda a, b: a + b,
            "-": lambda a, b: a - b,
        }
        return operations[node.value](left, right)
    if kind == "call":
        name = node.value
        arguments = node.parts[1:]
        if name == "fail":
            raise DeploymentFailed(_eval(arguments[0], scope))
        if name in ("map", "filter"):
            items = _eval(arguments[0], scope)
            function = arguments[1]
            (parameter,) = function.value
            results = [_eval(function.parts[0], {**scope, parameter: item}) for item in items]
            return results if name == "map" else [item for item, keep in zip(items, results, strict=True) if keep]
        return FUNCTIONS[name](*(_eval(argument, scope) for argument in arguments))
    raise ValueError(f"line {node.line}: cannot evaluate {kind}")


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)
