"""A parser for the Bicep that ``infra/`` is written in, keeping the line of every node.

Not a full Bicep grammar: declarations (``targetScope``, ``param``, ``var``, ``resource``,
``module``, ``output``, ``using`` and their ``@decorators``) and expressions (literals,
interpolated strings, multi-line strings, objects, arrays, ``for`` and ``if`` bodies, member,
index and safe access, calls, lambdas, unary, binary and ternary operators, ``??``).
Anything else is a :class:`BicepSyntaxError` naming the file and line, so a construct this
parser does not know fails loudly instead of being skipped. ``devtools.deploy.bicep_check`` reads
the trees.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class BicepSyntaxError(Exception):
    """The file does not parse; the message starts with ``file:line:``."""


@dataclass(frozen=True, slots=True)
class Token:
    kind: str  # name, number, string, op, newline, end
    value: Any
    line: int


@dataclass(slots=True)
class Node:
    """One expression: ``kind`` and its parts, and the line it starts on."""

    kind: str  # literal, string, name, object, array, member, index, call, unary, binary, ternary, lambda, for, if
    line: int
    value: Any = None
    parts: list[Any] = field(default_factory=list)
    # object: parts = [(key, key_line, Node)]; array: parts = [Node]; string: parts = [str | Node]


@dataclass(slots=True)
class Declaration:
    kind: str  # param, var, resource, module, output, targetScope, using, type, func, metadata, import
    name: str
    line: int
    type_text: str = ""  # param/output type, resource type@version, module path
    value: Node | None = None  # default, value, body
    decorators: list[Node] = field(default_factory=list)
    existing: bool = False


@dataclass(slots=True)
class BicepFile:
    path: Path
    declarations: list[Declaration]

    def of(self, kind: str) -> dict[str, Declaration]:
        return {d.name: d for d in self.declarations if d.kind == kind}


_TOKENS = re.compile(
    r"""
    (?P<space>[ \t\r]+)
  | (?P<comment>//[^\n]*)
  | (?P<block>/\*.*?\*/)
  | (?P<newline>\n)
  | (?P<multiline>'''.*?''')
  | (?P<string>')
  | (?P<number>\d+)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>\?\?|\?\.|=>|==|!=|<=|>=|&&|\|\||[-+*/%!<>?:.,=\[\]{}()@])
    """,
    re.VERBOSE | re.DOTALL,
)


def tokenize(text: str, path: str) -> list[Token]:
    tokens: list[Token] = []
    position, line = 0, 1
    while position < len(text):
        match = _TOKENS.match(text, position)
        if match is None:
            raise BicepSyntaxError(f"{path}:{line}: unexpected character {text[position]!r}")
        kind = match.lastgroup
        chunk = match.group()
        if kind == "string":
            end, parts = _string(text, match.end(), path, line)
            tokens.append(Token("string", parts, line))
            line += text.count("\n", position, end)
            position = end
            continue
        if kind == "newline":
            tokens.append(Token("newline", "\n", line))
        elif kind == "multiline":
            tokens.append(Token("string", [chunk[3:-3]], line))
        elif kind in ("number", "name", "op"):
            tokens.append(Token(kind, chunk, line))
        line += chunk.count("\n")
        position = match.end()
    tokens.append(Token("end", None, line))
    return tokens


def _string(text: str, position: int, path: str, line: int) -> tuple[int, list[Any]]:
    """An interpolated string from after its opening quote: (end, [text, (expression source, line), ...])."""
    parts: list[Any] = []
    chunk: list[str] = []
    while position < len(text):
        char = text[position]
        if char == "\\":
            chunk.append({"n": "\n", "t": "\t", "r": "\r", "$": "$", "'": "'", "\\": "\\"}.get(text[position + 1], ""))
            position += 2
        elif char == "'":
            parts.append("".join(chunk))
            return position + 1, parts
        elif text.startswith("${", position):
            parts.append("".join(chunk))
            chunk = []
            depth, start = 1, position + 2
            position = start
            while depth:
                if position >= len(text):
                    raise BicepSyntaxError(f"{path}:{line}: unterminated interpolation")
                depth += {"{": 1, "}": -1}.get(text[position], 0)
                position += 1
            parts.append((text[start : position - 1], line + text.count("\n", 0, start) - text.count("\n", 0, start)))
        elif char == "\n":
            raise BicepSyntaxError(f"{path}:{line}: unterminated string")
        else:
            chunk.append(char)
            position += 1
    raise BicepSyntaxError(f"{path}:{line}: unterminated string")


_BINARY = [["??"], ["||"], ["&&"], ["==", "!="], ["<", "<=", ">", ">="], ["+", "-"], ["*", "/", "%"]]


class _Parser:
    def __init__(self, tokens: list[Token], path: str) -> None:
        self.tokens, self.path, self.at = tokens, path, 0

    # Token helpers.
    def peek(self, skip_newlines: bool = False) -> Token:
        at = self.at
        while skip_newlines and self.tokens[at].kind == "newline":
            at += 1
        return self.tokens[at]

    def next(self) -> Token:
        token = self.tokens[self.at]
        self.at += 1
        return token

    def newlines(self) -> None:
        while self.peek().kind == "newline":
            self.at += 1

    def is_op(self, value: str, skip_newlines: bool = False) -> bool:
        token = self.peek(skip_newlines)
        return token.kind == "op" and token.value == value

    def expect(self, value: str) -> Token:
        token = self.next()
        if token.kind not in ("op", "name") or token.value != value:
            raise self.error(token, f"expected '{value}', found {token.value!r}")
        return token

    def error(self, token: Token, message: str) -> BicepSyntaxError:
        return BicepSyntaxError(f"{self.path}:{token.line}: {message}")

    # Declarations.
    def file(self) -> list[Declaration]:
        declarations: list[Declaration] = []
        decorators: list[Node] = []
        while True:
            self.newlines()
            token = self.peek()
            if token.kind == "end":
                if decorators:
                    raise self.error(token, "decorator without a declaration")
                return declarations
            if token.kind == "op" and token.value == "@":
                self.next()
                decorators.append(self.postfix())
                continue
            if token.kind != "name":
                raise self.error(token, f"expected a declaration, found {token.value!r}")
            declaration = self.declaration()
            declaration.decorators = decorators
            decorators = []
            declarations.append(declaration)

    def declaration(self) -> Declaration:
        keyword = self.next()
        line = keyword.line
        if keyword.value == "targetScope":
            self.expect("=")
            return Declaration("targetScope", "targetScope", line, value=self.expression())
        if keyword.value == "using":
            return Declaration("using", "using", line, value=self.primary())
        if keyword.value in ("param", "var", "output", "resource", "module"):
            name = self.next()
            if name.kind != "name":
                raise self.error(name, f"expected a name after {keyword.value}")
            declaration = Declaration(keyword.value, name.value, line)
            if keyword.value in ("resource", "module"):
                path = self.next()
                if path.kind != "string" or len(path.value) != 1:
                    raise self.error(path, f"expected the {keyword.value}'s type as a plain string")
                declaration.type_text = path.value[0]
                if self.peek().kind == "name" and self.peek().value == "existing":
                    self.next()
                    declaration.existing = True
                self.expect("=")
                declaration.value = self.expression()
                return declaration
            if keyword.value in ("param", "output") and not self.is_op("="):
                declaration.type_text = self.type_expression()
            if self.is_op("="):
                self.next()
                declaration.value = self.expression()
            elif keyword.value != "param":
                raise self.error(self.peek(), f"expected '=' in {keyword.value} {name.value}")
            return declaration
        raise self.error(keyword, f"unknown declaration '{keyword.value}'")

    def type_expression(self) -> str:
        parts = []
        while self.peek().kind in ("name", "string") or (self.peek().kind == "op" and self.peek().value in "|?[]"):
            token = self.next()
            parts.append(token.value if token.kind != "string" else repr(token.value))
            if token.kind == "name" and not (self.peek().kind == "op" and self.peek().value in "|?[]"):
                break
        if not parts:
            raise self.error(self.peek(), "expected a type")
        return "".join(str(p) for p in parts)

    # Expressions.
    def expression(self) -> Node:
        condition = self.binary(0)
        if self.is_op("?", skip_newlines=True):
            self.newlines()
            self.next()
            self.newlines()
            yes = self.expression()
            self.newlines()
            self.expect(":")
            self.newlines()
            no = self.expression()
            return Node("ternary", condition.line, parts=[condition, yes, no])
        return condition

    def binary(self, level: int) -> Node:
        if level == len(_BINARY):
            return self.unary()
        left = self.binary(level + 1)
        while self.peek().kind == "op" and self.peek().value in _BINARY[level]:
            operator = self.next().value
            self.newlines()
            right = self.binary(level + 1)
            left = Node("binary", left.line, operator, [left, right])
        return left

    def unary(self) -> Node:
        token = self.peek()
        if token.kind == "op" and token.value in ("!", "-"):
            self.next()
            return Node("unary", token.line, token.value, [self.unary()])
        return self.postfix()

    def postfix(self) -> Node:
        node = self.primary()
        while True:
            token = self.peek()
            if token.kind == "op" and token.value in (".", "?."):
                self.next()
                member = self.next()
                if member.kind != "name":
                    raise self.error(member, "expected a property name after '.'")
                if self.is_op("("):  # namespace function: sys.concat(...), az.resourceGroup()
                    node = Node("call", member.line, member.value, [node, *self.arguments()])
                else:
                    node = Node("member", member.line, member.value, [node])
            elif token.kind == "op" and token.value == "[":
                self.next()
                self.newlines()
                index = self.expression()
                self.newlines()
                self.expect("]")
                node = Node("index", token.line, None, [node, index])
            elif (
                token.kind == "op" and token.value == "!" and self.tokens[self.at + 1].kind in ("op", "newline", "end")
            ):
                self.next()  # non-null assertion
            else:
                return node

    def arguments(self) -> list[Node]:
        self.expect("(")
        arguments = []
        self.newlines()
        while not self.is_op(")"):
            arguments.append(self.expression())
            self.newlines()
            if self.is_op(","):
                self.next()
                self.newlines()
        self.expect(")")
        return arguments

    def primary(self) -> Node:
        token = self.next()
        if token.kind == "number":
            return Node("literal", token.line, int(token.value))
        if token.kind == "string":
            if all(isinstance(p, str) for p in token.value):
                return Node("literal", token.line, "".join(token.value))
            return self.primary_from_string(token)
        if token.kind == "name":
            if token.value in ("true", "false"):
                return Node("literal", token.line, token.value == "true")
            if token.value == "null":
                return Node("literal", token.line, None)
            if self.is_op("=>"):
                self.next()
                return Node("lambda", token.line, [token.value], [self.expression()])
            if token.value == "if" and self.is_op("("):
                self.next()
                condition = self.expression()
                self.expect(")")
                self.newlines()
                return Node("if", token.line, None, [condition, self.primary()])
            if self.is_op("("):
                return Node("call", token.line, token.value, [None, *self.arguments()])
            return Node("name", token.line, token.value)
        if token.kind == "op" and token.value == "(":
            start = self.at
            names = self.lambda_parameters()
            if names is not None:
                return Node("lambda", token.line, names, [self.expression()])
            self.at = start
            self.newlines()
            inner = self.expression()
            self.newlines()
            self.expect(")")
            return inner
        if token.kind == "op" and token.value == "{":
            return self.object(token)
        if token.kind == "op" and token.value == "[":
            return self.array(token)
        raise self.error(token, f"unexpected {token.value!r}")

    def lambda_parameters(self) -> list[str] | None:
        names = []
        while self.peek().kind == "name":
            names.append(self.next().value)
            if self.is_op(","):
                self.next()
        if self.is_op(")") and self.tokens[self.at + 1].kind == "op" and self.tokens[self.at + 1].value == "=>":
            self.at += 2
            return names
        return None

    def interpolation(self, part: tuple[str, int]) -> Node:
        source, line = part
        tokens = [Token(t.kind, t.value, t.line + line - 1) for t in tokenize(source, self.path)]
        parser = _Parser(tokens, self.path)
        node = parser.expression()
        if parser.peek(skip_newlines=True).kind != "end":
            raise self.error(parser.peek(), "unexpected text in ${...}")
        return node

    def object(self, opening: Token) -> Node:
        entries: list[Any] = []
        while True:
            self.newlines()
            token = self.next()
            if token.kind == "op" and token.value == "}":
                return Node("object", opening.line, None, entries)
            if token.kind == "name":
                key = token.value
            elif token.kind == "string":
                key = (
                    "".join(token.value)
                    if all(isinstance(p, str) for p in token.value)
                    else self.primary_from_string(token)
                )
            else:
                raise self.error(token, f"expected a property name, found {token.value!r}")
            self.expect(":")
            self.newlines()
            entries.append((key, token.line, self.expression()))
            if self.is_op(","):
                self.next()

    def primary_from_string(self, token: Token) -> Node:
        return Node(
            "string", token.line, None, [p if isinstance(p, str) else self.interpolation(p) for p in token.value]
        )

    def array(self, opening: Token) -> Node:
        self.newlines()
        if self.peek().kind == "name" and self.peek().value == "for":
            self.next()
            if self.is_op("("):
                self.next()
                names = [self.next().value]
                while self.is_op(","):
                    self.next()
                    names.append(self.next().value)
                self.expect(")")
            else:
                names = [self.next().value]
            self.expect("in")
            source = self.expression()
            self.expect(":")
            self.newlines()
            body = self.expression()
            self.newlines()
            self.expect("]")
            return Node("for", opening.line, names, [source, body])
        items: list[Any] = []
        while True:
            self.newlines()
            if self.is_op("]"):
                self.next()
                return Node("array", opening.line, None, items)
            items.append(self.expression())
            if self.is_op(","):
                self.next()


def parse(path: Path, text: str | None = None, name: str | None = None) -> BicepFile:
    """The declarations of one ``.bicep`` or ``.bicepparam`` file; ``name`` is how messages call it."""
    shown = name or str(path)
    source = path.read_text() if text is None else text
    return BicepFile(path, _Parser(tokenize(source, shown), shown).file())
