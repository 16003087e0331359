"""A small reader for Azure CycleCloud cluster template files, enough to check ours without Azure.

The format: sections whose rank is their number of brackets (``[cluster c]``, ``[[node n]]``,
``[[[configuration]]]``, ...), each nested in the last section of the rank above; ``Key = value``
(and ``Key := expression``) attributes; whole-line ``#`` comments; values may be ``'''``-quoted over
several lines. Keys and section kinds are case-insensitive, as in CycleCloud.

Parameter references: ``$Name`` anywhere in a value, and bare names inside ``${...}`` expressions
(``${ifThenElse(UseBuiltinShared, undefined, NFSAddress)}``) or in ``:=`` conditions.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HEADER = re.compile(r"^(\[+)\s*([^\[\]]+?)\s*(\]+)$")
ATTRIBUTE = re.compile(r"^([A-Za-z_][\w.\-]*)\s*(:?=)\s*(.*)$")
DOLLAR_NAME = re.compile(r"\$(?!\{)([A-Za-z_]\w*)")
EXPRESSION = re.compile(r"\$\{([^}]*)\}")
STRING_LITERAL = re.compile(r'"[^"]*"')
IDENTIFIER = re.compile(r"\$?([A-Za-z_]\w*)(\s*\()?")
# Words of the expression language and names CycleCloud itself provides, not parameters.
NOT_PARAMETERS = frozenset({"undefined", "true", "false", "null", "is", "isnt", "ClusterName"})


class TemplateError(ValueError):
    pass


@dataclass
class Section:
    kind: str  # "cluster", "node", "nodearray", "configuration", "cluster-init", "parameter", ...
    name: str  # the rest of the header: "gpu", "mpistyle:default:1.0.0", "" when none
    rank: int  # number of brackets
    line: int
    attributes: dict[str, str] = field(default_factory=dict)  # keys lower-cased
    expressions: set[str] = field(default_factory=set)  # keys set with ":=" (lower-cased)
    children: list[Section] = field(default_factory=list)

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.attributes.get(key.lower(), default)

    def sections(self, kind: str, name: str | None = None) -> list[Section]:
        """Direct children of this kind (and name, when given)."""
        return [s for s in self.children if s.kind == kind.lower() and (name is None or s.name == name)]

    def walk(self) -> Iterator[Section]:
        yield self
        for child in self.children:
            yield from child.walk()

    def __str__(self) -> str:
        brackets = "[" * self.rank, "]" * self.rank
        return f"{brackets[0]}{self.kind} {self.name}{brackets[1]} (line {self.line})"


@dataclass
class Template:
    roots: list[Section]

    def sections(self, kind: str) -> list[Section]:
        return [s for s in self.roots if s.kind == kind.lower()]

    def walk(self) -> Iterator[Section]:
        for root in self.roots:
            yield from root.walk()


def parse(text: str) -> Template:
    roots: list[Section] = []
    open_sections: list[Section] = []  # the current section of each rank, outermost first
    lines = text.splitlines()
    number = 0
    while number < len(lines):
        raw = lines[number]
        number += 1
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        header = HEADER.match(line)
        if header:
            rank = len(header.group(1))
            if len(header.group(3)) != rank:
                raise TemplateError(f"line {number}: unbalanced brackets in {line!r}")
            if rank > len(open_sections) + 1:
                raise TemplateError(f"line {number}: {line!r} has no enclosing section of rank {rank - 1}")
            kind, _, name = header.group(2).partition(" ")
            section = Section(kind.lower(), name.strip(), rank, number)
            del open_sections[rank - 1:]
            (open_sections[-1].children if open_sections else roots).append(section)
            open_sections.append(section)
            continue
        attribute = ATTRIBUTE.match(line)
        if not attribute:
            raise TemplateError(f"line {number}: neither a section header nor 'Key = value': {line!r}")
        if not open_sections:
            raise TemplateError(f"line {number}: attribute outside any section: {line!r}")
        key, operator, value = attribute.group(1).lower(), attribute.group(2), attribute.group(3).strip()
        if value.startswith("'''"):
            start, value = number, value[3:]
            while "'''" not in value:
                if number >= len(lines):
                    raise TemplateError(f"line {start}: ''' value never closed")
                value += "\n" + lines[number]
                number += 1
            value = value[: value.index("'''")]
        section = open_sections[-1]
        if key in section.attributes:
            raise TemplateError(f"line {number}: {attribute.group(1)} set twice in {section}")
        section.attributes[key] = value
        if operator == ":=":
            section.expressions.add(key)
    return Template(roots)


def load(path: Path) -> Template:
    return parse(path.read_text())


def unquote(value: str) -> str:
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value


def names_in_expression(expression: str) -> set[str]:
    """Parameter names an expression reads: identifiers that are not functions, words of the
    language or string literals."""
    names = set()
    for match in IDENTIFIER.finditer(STRING_LITERAL.sub("", expression)):
        if match.group(2) is None and match.group(1) not in NOT_PARAMETERS:
            names.add(match.group(1))
    return names


def references(section: Section) -> dict[str, list[str]]:
    """Every parameter name read anywhere in ``section`` and below -> where (for messages)."""
    found: dict[str, list[str]] = {}
    for node in section.walk():
        for key, value in node.attributes.items():
            names = set(DOLLAR_NAME.findall(value))
            for expression in EXPRESSION.findall(value):
                names |= names_in_expression(expression)
            if key in node.expressions:
                names |= names_in_expression(value)
            for name in names:
                found.setdefault(name, []).append(f"{node} {key}")
    return found
