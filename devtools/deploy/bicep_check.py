"""What a Bicep compiler would refuse in ``infra/``, checked without one.

``python -m devtools.deploy.bicep_check [infra]`` prints one ``file:line: problem`` per finding and exits 1
if there is any. It checks, over every ``.bicep`` file and ``main.bicepparam``:

- every name used resolves: parameters, variables, resources, modules, loop variables, lambda
  parameters, and the built-in functions; nothing is declared twice;
- every module exists, is given only parameters it declares and every one it requires, and is
  read only through outputs it declares (``mod.outputs.X``, ``mod[i].outputs.X``);
- every resource type and API version is one Azure publishes, every property set under it is
  one that type defines and may be written, its required properties are present, a literal
  value is one the property allows, and every property read from a resource
  (``storage.properties.primaryEndpoints.blob``) is one the type has;
- ``main.bicepparam`` uses ``main.bicep`` and sets only parameters it declares.

The resource types come from Azure's own published definitions (``devtools.deploy.bicep_types``):
the subset for the types ``infra/`` uses is kept in ``tests/data/bicep_types.json``, with the
repository's commit. ``python -m devtools.deploy.bicep_check --extract GIT_DIR`` rebuilds it from a
clone of ``Azure/bicep-types-az`` (add a type to ``TYPES`` first).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devtools.deploy.bicep_parse import BicepFile, BicepSyntaxError, Declaration, Node, parse
from devtools.deploy.bicep_types import READ_ONLY, REQUIRED, ROOT, TYPES_FILE, Types, extract

FUNCTIONS = frozenset(
    """any array bool concat contains empty first last indexOf intersection items join lastIndexOf length max min
    range skip take union filter map reduce sort toObject flatten objectKeys shallowMerge tryGet coalesce equals
    dateTimeAdd dateTimeFromEpoch dateTimeToEpoch utcNow deployment environment extensionResourceId managementGroup
    managementGroupResourceId pickZones providers reference resourceGroup resourceId subscription
    subscriptionResourceId tenant tenantResourceId int json string base64 base64ToJson base64ToString dataUri
    dataUriToString endsWith format guid newGuid padLeft replace split startsWith substring toLower toUpper trim
    uniqueString uri uriComponent uriComponentToString loadTextContent loadJsonContent loadYamlContent
    loadFileAsBase64 readEnvironmentVariable getSecret fail parseCidr cidrSubnet cidrHost listKeys
    listAccountSas listServiceSas listSecrets""".split()  # noqa: SIM905 (a list of 100 names reads better so)
)
DECORATORS = frozenset(
    {"description", "minLength", "maxLength", "minValue", "maxValue", "allowed", "secure", "batchSize", "metadata"}
    | {"export", "sealed", "discriminator", "onlyIfNotExists"}
)
NAMESPACES = frozenset({"az", "sys"})
RESOURCE_KEYWORDS = frozenset({"parent", "scope", "dependsOn"})
MODULE_KEYS = {"name", "params", "dependsOn", "scope"}


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class _File:
    """One file being checked: its declarations and how to report a problem in it."""

    def __init__(self, parsed: BicepFile, shown: str, problems: list[Problem]) -> None:
        self.parsed, self.shown, self.problems = parsed, shown, problems
        self.symbols: dict[str, Declaration] = {}
        for declaration in parsed.declarations:
            if declaration.kind in ("param", "var", "resource", "module"):
                if declaration.name in self.symbols:
                    self.report(declaration.line, f"'{declaration.name}' is declared twice")
                self.symbols[declaration.name] = declaration

    def report(self, line: int, message: str) -> None:
        self.problems.append(Problem(self.shown, line, message))


class Checker:
    def __init__(self, infra: Path, types: Types) -> None:
        self.infra, self.types = infra, types
        self.problems: list[Problem] = []
        self.files: dict[Path, _File] = {}

    def run(self) -> list[Problem]:
        for path in sorted(self.infra.rglob("*.bicep")):
            self.load(path)
        for path, file in list(self.files.items()):
            self.check_file(path, file)
        parameters = self.infra / "main.bicepparam"
        if parameters.exists():
            self.check_parameters(parameters)
        return sorted(set(self.problems), key=lambda p: (p.file, p.line, p.message))

    def shown(self, path: Path) -> str:
        return f"{self.infra.name}/{path.relative_to(self.infra).as_posix()}"

    def load(self, path: Path) -> _File | None:
        path = path.resolve()
        if path not in self.files:
            try:
                parsed = parse(path, name=self.shown(path))
            except BicepSyntaxError as error:
                file, line, message = str(error).split(":", 2)
                self.problems.append(Problem(file, int(line), message.strip()))
                return None
            self.files[path] = _File(parsed, self.shown(path), self.problems)
        return self.files[path]

    # One file.
    def check_file(self, path: Path, file: _File) -> None:
        for declaration in file.parsed.declarations:
            for decorator in declaration.decorators:
                self.check_decorator(file, decorator)
            if declaration.kind == "module":
                self.check_module(path, file, declaration)
            elif declaration.kind == "resource":
                self.check_resource(file, declaration)
            elif declaration.value is not None:
                self.expression(file, declaration.value, frozenset())

    def check_decorator(self, file: _File, decorator: Node) -> None:
        if decorator.kind != "call" or (decorator.parts[0] is None and decorator.value not in DECORATORS):
            file.report(decorator.line, f"unknown decorator @{decorator.value}")
        for argument in decorator.parts[1:]:
            self.expression(file, argument, frozenset())

    def check_module(self, path: Path, file: _File, module: Declaration) -> None:
        target = self.load(path.parent / module.type_text)
        if not (path.parent / module.type_text).exists():
            file.report(module.line, f"module '{module.name}': {module.type_text} does not exist")
            return
        body, scope = self.unwrap(file, module.value, frozenset())
        if body is None or target is None:
            return
        declared = target.parsed.of("param")
        for key, line, value in body.parts:
            if key not in MODULE_KEYS:
                file.report(
                    line, f"module '{module.name}': '{key}' is not a module property ({', '.join(sorted(MODULE_KEYS))})"
                )
            if key == "params" and value.kind == "object":
                for name, param_line, argument in value.parts:
                    if name not in declared:
                        file.report(param_line, f"module '{module.name}': {module.type_text} has no parameter '{name}'")
                    self.expression(file, argument, scope)
                given = {name for name, _, _ in value.parts}
                for name, parameter in declared.items():
                    if parameter.value is None and not parameter.type_text.endswith("?") and name not in given:
                        file.report(
                            module.line,
                            f"module '{module.name}': required parameter '{name}' of {module.type_text} is not given",
                        )
            elif key == "dependsOn":
                self.check_depends_on(file, value, scope)
            else:
                self.expression(file, value, scope)

    def check_depends_on(self, file: _File, value: Node, scope: frozenset[str]) -> None:
        for item in value.parts if value.kind == "array" else []:
            root = item
            while root.kind in ("index", "member"):
                root = root.parts[0]
            declared = file.symbols.get(root.value) if root.kind == "name" else None
            if declared is None or declared.kind not in ("resource", "module"):
                file.report(item.line, "dependsOn lists only resources and modules of this file")
            self.expression(file, item, scope)

    def check_resource(self, file: _File, resource: Declaration) -> None:
        body, scope = self.unwrap(file, resource.value, frozenset())
        resource_type = resource.type_text
        type_body = self.types.body(resource_type)
        if type_body is None:
            file.report(
                resource.line,
                f"resource '{resource.name}': {self.types.unknown(resource_type)}",
            )
        if body is None:
            return
        if resource.existing:
            for key, line, value in body.parts:
                if key not in ("name", "scope", "parent"):
                    file.report(
                        line,
                        f"existing resource '{resource.name}': only name, scope and parent may be set, not '{key}'",
                    )
                self.expression(file, value, scope)
            return
        for key, _, value in body.parts:
            if key == "dependsOn":
                self.check_depends_on(file, value, scope)
            elif key in ("parent", "scope"):
                self.expression(file, value, scope)
        if type_body is not None:
            self.check_object(file, body, type_body, f"{resource_type}", scope, skip=RESOURCE_KEYWORDS)
        else:
            for key, _, value in body.parts:
                if key not in RESOURCE_KEYWORDS:
                    self.expression(file, value, scope)

    def unwrap(self, file: _File, node: Node | None, scope: frozenset[str]) -> tuple[Node | None, frozenset[str]]:
        """A resource's or module's body under its ``for`` and ``if``, and the loop variables in scope."""
        while node is not None and node.kind in ("for", "if"):
            if node.kind == "for":
                self.expression(file, node.parts[0], scope)
                scope = scope | set(node.value)
                node = node.parts[1]
            else:
                self.expression(file, node.parts[0], scope)
                node = node.parts[1]
        if node is not None and node.kind != "object":
            file.report(node.line, "expected an object body")
            return None, scope
        return node, scope

    # Values against Azure's types.
    def check_object(
        self,
        file: _File,
        node: Node,
        type_: dict[str, Any],
        where: str,
        scope: frozenset[str],
        skip: frozenset[str] = frozenset(),
    ) -> None:
        type_ = self.concrete(type_, node)
        if type_.get("$type") != "ObjectType":
            for _, _, value in node.parts:
                self.expression(file, value, scope)
            return
        properties: dict[str, Any] = type_.get("properties", {})
        extra = type_.get("additionalProperties")
        for key, line, value in node.parts:
            if not isinstance(key, str):  # '${identityId}': a computed key, checked as an expression
                self.expression(file, key, scope)
                if extra is not None:
                    self.check_value(file, value, self.types.at(extra), where, scope)
                else:
                    self.expression(file, value, scope)
                continue
            if key in skip:
                continue
            if key in properties:
                flags = properties[key].get("flags", 0)
                if flags & READ_ONLY and not flags & REQUIRED:
                    file.report(line, f"{where}.{key} is read-only: it cannot be set")
                self.check_value(file, value, self.types.at(properties[key]["type"]), f"{where}.{key}", scope)
            elif extra is not None:
                self.check_value(file, value, self.types.at(extra), f"{where}.{key}", scope)
            else:
                known = ", ".join(sorted(k for k, p in properties.items() if not p.get("flags", 0) & READ_ONLY))
                file.report(line, f"{where} has no property '{key}' (it has: {known})")
                self.expression(file, value, scope)
        given = {key for key, _, _ in node.parts if isinstance(key, str)}
        for name, prop in properties.items():
            if prop.get("flags", 0) & REQUIRED and not prop.get("flags", 0) & READ_ONLY and name not in given:
                file.report(node.line, f"{where}: required property '{name}' is missing")

    def concrete(self, type_: dict[str, Any], node: Node) -> dict[str, Any]:
        """A discriminated object type resolved by the literal value of its discriminator, if given."""
        if type_.get("$type") != "DiscriminatedObjectType":
            return type_
        key = type_["discriminator"]
        value = next((v for k, _, v in node.parts if k == key), None)
        if value is None or value.kind != "literal" or value.value not in type_["elements"]:
            return {"$type": "AnyType"}
        chosen = self.types.at(type_["elements"][value.value])
        merged = {**type_.get("baseProperties", {}), **chosen.get("properties", {})}
        return {**chosen, "properties": merged}

    def check_value(self, file: _File, node: Node, type_: dict[str, Any], where: str, scope: frozenset[str]) -> None:
        if node.kind == "ternary":
            self.expression(file, node.parts[0], scope)
            for branch in node.parts[1:]:
                self.check_value(file, branch, type_, where, scope)
            return
        if node.kind == "for":
            self.expression(file, node.parts[0], scope)
            if type_.get("$type") == "ArrayType":
                self.check_value(
                    file, node.parts[1], self.types.at(type_["itemType"]), f"{where}[]", scope | set(node.value)
                )
            else:
                self.expression(file, node.parts[1], scope | set(node.value))
            return
        kind = type_.get("$type")
        if node.kind == "object" and kind in ("ObjectType", "DiscriminatedObjectType"):
            self.check_object(file, node, type_, where, scope)
        elif node.kind == "array" and kind == "ArrayType":
            for item in node.parts:
                self.check_value(file, item, self.types.at(type_["itemType"]), f"{where}[]", scope)
        elif node.kind == "literal" and isinstance(node.value, str):
            allowed = self.literals(type_)
            if allowed is not None and node.value not in allowed:
                file.report(node.line, f"{where} is '{node.value}', not one of {', '.join(sorted(allowed))}")
        else:
            self.expression(file, node, scope)

    def literals(self, type_: dict[str, Any]) -> set[str] | None:
        """The strings a type allows, or None when it allows any (or is not a string type)."""
        kind = type_.get("$type")
        if kind == "StringLiteralType":
            return {type_["value"]}
        if kind == "UnionType":
            allowed: set[str] = set()
            for element in type_["elements"]:
                more = self.literals(self.types.at(element))
                if more is None:
                    return None
                allowed |= more
            return allowed
        return None

    # Expressions: names resolve, modules and resources are read through what they have.
    def expression(self, file: _File, node: Node | None, scope: frozenset[str]) -> None:
        if node is None:
            return
        kind = node.kind
        if kind == "name":
            if node.value not in scope and node.value not in file.symbols:
                file.report(node.line, f"'{node.value}' is not declared")
        elif kind == "call":
            namespace, *arguments = node.parts
            if namespace is None and node.value not in FUNCTIONS and node.value not in scope:
                file.report(node.line, f"'{node.value}' is not a function")
            if namespace is not None and not (namespace.kind == "name" and namespace.value in NAMESPACES):
                self.expression(file, namespace, scope)
            for argument in arguments:
                self.expression(file, argument, scope)
        elif kind in ("member", "index"):
            self.access(file, node, scope)
        elif kind == "lambda":
            self.expression(file, node.parts[0], scope | set(node.value))
        elif kind in ("for",):
            self.expression(file, node.parts[0], scope)
            self.expression(file, node.parts[1], scope | set(node.value))
        elif kind == "object":
            for key, _, value in node.parts:
                if not isinstance(key, str):
                    self.expression(file, key, scope)
                self.expression(file, value, scope)
        elif kind == "string":
            for part in node.parts:
                if not isinstance(part, str):
                    self.expression(file, part, scope)
        else:
            for part in node.parts:
                if isinstance(part, Node):
                    self.expression(file, part, scope)

    def access(self, file: _File, node: Node, scope: frozenset[str]) -> None:
        """``a.b[i].c``: the root resolves; a module is read through its outputs, a resource through its type."""
        chain: list[Node] = []
        root = node
        while root.kind in ("member", "index"):
            chain.append(root)
            root = root.parts[0]
        chain.reverse()
        for step in chain:
            if step.kind == "index":
                self.expression(file, step.parts[1], scope)
        self.expression(file, root, scope)
        if root.kind != "name" or root.value in scope:
            return
        declared = file.symbols.get(root.value)
        members = [step for step in chain if step.kind == "member"]
        if declared is None or not members:
            return
        if declared.kind == "module":
            self.module_access(file, declared, members)
        elif declared.kind == "resource":
            self.resource_access(file, declared, members)

    def module_access(self, file: _File, module: Declaration, members: list[Node]) -> None:
        first = members[0]
        if first.value == "name":
            return
        if first.value != "outputs":
            file.report(first.line, f"module '{module.name}' has no property '{first.value}' (name, outputs)")
            return
        if len(members) < 2:
            return
        target = self.files.get((self.infra / module.type_text).resolve()) or self.files.get(
            (self.module_dir(file) / module.type_text).resolve()
        )
        if target is None:
            return
        outputs = target.parsed.of("output")
        if members[1].value not in outputs:
            file.report(
                members[1].line,
                f"module '{module.name}' has no output '{members[1].value}' ({module.type_text} declares: "
                f"{', '.join(sorted(outputs))})",
            )

    def module_dir(self, file: _File) -> Path:
        return file.parsed.path.parent

    def resource_access(self, file: _File, resource: Declaration, members: list[Node]) -> None:
        type_: dict[str, Any] | None = self.types.body(resource.type_text)
        where = resource.name
        for member in members:
            if type_ is None:
                return
            kind = type_.get("$type")
            if kind == "DiscriminatedObjectType":
                properties = {**type_.get("baseProperties", {})}
                for element in type_["elements"].values():
                    properties.update(self.types.at(element).get("properties", {}))
            elif kind == "ObjectType":
                properties = type_.get("properties", {})
            else:
                return
            if member.value in properties:
                type_ = self.types.at(properties[member.value]["type"])
            elif type_.get("additionalProperties") is not None:
                type_ = self.types.at(type_["additionalProperties"])
            else:
                file.report(member.line, f"{where} ({resource.type_text}) has no property '{member.value}'")
                return
            where = f"{where}.{member.value}"

    # main.bicepparam.
    def check_parameters(self, path: Path) -> None:
        try:
            parsed = parse(path, name=self.shown(path))
        except BicepSyntaxError as error:
            file_name, line, message = str(error).split(":", 2)
            self.problems.append(Problem(file_name, int(line), message.strip()))
            return
        file = _File(parsed, self.shown(path), self.problems)
        using = next((d for d in parsed.declarations if d.kind == "using"), None)
        if using is None or using.value is None or using.value.kind != "literal":
            file.report(1, "main.bicepparam does not start with using './main.bicep'")
            return
        target = self.files.get((path.parent / using.value.value).resolve())
        if target is None:
            file.report(using.line, f"using '{using.value.value}': no such template")
            return
        declared = target.parsed.of("param")
        for declaration in parsed.declarations:
            if declaration.kind == "param":
                if declaration.name not in declared:
                    file.report(declaration.line, f"{target.shown} has no parameter '{declaration.name}'")
                self.expression(file, declaration.value, frozenset())
        given = set(parsed.of("param"))
        for name, parameter in declared.items():
            if parameter.value is None and not parameter.type_text.endswith("?") and name not in given:
                file.report(using.line, f"required parameter '{name}' of {target.shown} is not set")


def check(infra: Path, types: Types | None = None) -> list[Problem]:
    """Every problem a compiler would report in ``infra`` (its ``.bicep`` files and ``main.bicepparam``)."""
    return Checker(infra.resolve(), types or Types.load()).run()


def _problems(infra: Path) -> Iterator[str]:
    for problem in check(infra):
        yield str(problem)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.deploy.bicep_check", description=__doc__.splitlines()[0])
    parser.add_argument("infra", nargs="?", default=str(ROOT / "infra"))
    parser.add_argument("--extract", metavar="GIT_DIR", help="rebuild tests/data/bicep_types.json from this clone")
    args = parser.parse_args(argv)
    if args.extract:
        TYPES_FILE.write_text(json.dumps(extract(Path(args.extract)), separators=(",", ":")) + "\n")
        print(f"{TYPES_FILE}: {TYPES_FILE.stat().st_size // 1024} KiB")
        return 0
    problems = list(_problems(Path(args.infra)))
    for line in problems:
        print(line)
    print(f"{len(problems)} problem(s)" if problems else "no problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
