"""An ARM deployment template (deploy/azure/main.json) read and evaluated without Azure: its
template expressions (``"[format('{0}/default', parameters('x'))]"``) parsed and evaluated for
given parameter values, with stand-ins for what only a deployment knows (the subscription, the
resource group, ``reference()`` of a resource made in the same deployment). Only the functions
the template uses are known: an unknown function, parameter or variable is an error, so a typo
fails here instead of in Azure."""
from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"
RESOURCE_GROUP = "mpistyle-rg"
RESOURCE_GROUP_ID = f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}"
REGION = "westeurope"


class ExpressionError(ValueError):
    """A template expression that does not parse or evaluate."""


@dataclass(frozen=True)
class Call:
    function: str
    args: tuple[Any, ...]


@dataclass(frozen=True)
class Access:
    target: Any
    key: Any  # a property name (str) or an index expression


_TOKEN = re.compile(r"\s*(?:(?P<string>'(?:[^']|'')*')|(?P<number>-?\d+)|(?P<name>[A-Za-z_][\w]*)|(?P<punct>[(),.\[\]]))")


def _tokens(text: str) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ExpressionError(f"cannot read {text[pos:]!r} in [{text}]")
        kind = match.lastgroup
        assert kind is not None
        found.append((kind, match.group(kind)))
        pos = match.end()
    return found


def parse(expression: str) -> Any:
    """The syntax tree of one expression, given without its outer brackets."""
    tokens = _tokens(expression)
    pos = 0

    def peek() -> tuple[str, str] | None:
        return tokens[pos] if pos < len(tokens) else None

    def take(value: str | None = None) -> tuple[str, str]:
        nonlocal pos
        if pos >= len(tokens):
            raise ExpressionError(f"[{expression}] ends too early")
        token = tokens[pos]
        if value is not None and token[1] != value:
            raise ExpressionError(f"expected {value!r}, found {token[1]!r} in [{expression}]")
        pos += 1
        return token

    def primary() -> Any:
        kind, value = take()
        if kind == "string":
            node: Any = value[1:-1].replace("''", "'")
        elif kind == "number":
            node = int(value)
        elif kind == "name":
            take("(")
            args: list[Any] = []
            if peek() != ("punct", ")"):
                args.append(primary())
                while peek() == ("punct", ","):
                    take(",")
                    args.append(primary())
            take(")")
            node = Call(value, tuple(args))
        else:
            raise ExpressionError(f"unexpected {value!r} in [{expression}]")
        while peek() in (("punct", "."), ("punct", "[")):
            if take()[1] == ".":
                kind, key = take()
                if kind != "name":
                    raise ExpressionError(f"a property name must follow '.', found {key!r} in [{expression}]")
                node = Access(node, key)
            else:
                node = Access(node, primary())
                take("]")
        return node

    tree = primary()
    if pos != len(tokens):
        raise ExpressionError(f"unexpected {tokens[pos][1]!r} after a whole expression in [{expression}]")
    return tree


def is_expression(value: Any) -> bool:
    """ARM's rule: a string in brackets is an expression, unless it starts with '[['."""
    return isinstance(value, str) and value.startswith("[") and value.endswith("]") and not value.startswith("[[")


def resource_id(resource_type: str, *names: str, prefix: str = RESOURCE_GROUP_ID) -> str:
    """ARM's resourceId(): 'NS/t1/t2' with names n1, n2 -> PREFIX/providers/NS/t1/n1/t2/n2."""
    namespace, *types = resource_type.split("/")
    if len(types) != len(names):
        raise ExpressionError(f"{resource_type} takes {len(types)} names, got {len(names)}: {names}")
    path = "/".join(f"{t}/{n}" for t, n in zip(types, names, strict=True))
    return f"{prefix}/providers/{namespace}/{path}"


def split_id(full_id: str) -> tuple[str, list[str]]:
    """The resource type and names of a resource id made by resource_id (the last provider's)."""
    tail = full_id.rsplit("/providers/", 1)[1].split("/")
    namespace, rest = tail[0], tail[1:]
    return "/".join([namespace, *rest[0::2]]), rest[1::2]


def unique_string(*parts: str) -> str:
    """A stand-in for uniqueString(): 13 lower-case base-32 characters, deterministic."""
    digest = hashlib.sha256("|".join(parts).encode()).digest()
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    number = int.from_bytes(digest[:9], "big")
    return "".join(alphabet[(number >> (5 * i)) & 31] for i in range(13))


def _format(template: str, *args: Any) -> str:
    def field(match: re.Match[str]) -> str:
        if match.group(0) in ("{{", "}}"):
            return match.group(0)[0]
        index = int(match.group(1))
        if index >= len(args):
            raise ExpressionError(f"format('{template}') has no argument {index}")
        value = args[index]
        return str(value).lower() if isinstance(value, bool) else str(value)

    return re.sub(r"\{\{|\}\}|\{(\d+)\}", field, template)


class Template:
    """main.json with a set of parameter values (the defaults, overridden by ``values``)."""

    def __init__(self, path: Path, values: Mapping[str, Any] | None = None) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text())
        self.values = dict(values or {})
        unknown = set(self.values) - set(self.data.get("parameters", {}))
        if unknown:
            raise ExpressionError(f"no such parameters: {sorted(unknown)}")
        self._parameters: dict[str, Any] = {}
        self._variables: dict[str, Any] = {}
        self.used_parameters: set[str] = set()
        self.used_variables: set[str] = set()
        self.functions: dict[str, Callable[..., Any]] = {
            "parameters": self.parameter,
            "variables": self.variable,
            "format": _format,
            "concat": lambda *a: "".join(str(x) for x in a),
            "take": lambda value, n: value[: max(0, n)],
            "toLower": lambda value: value.lower(),
            "uniqueString": unique_string,
            "guid": lambda *a: str(uuid.uuid5(uuid.NAMESPACE_URL, "|".join(a))),
            "resourceGroup": lambda: {"id": RESOURCE_GROUP_ID, "name": RESOURCE_GROUP, "location": REGION},
            "resourceId": resource_id,
            "subscriptionResourceId": lambda t, *n: resource_id(t, *n, prefix=f"/subscriptions/{SUBSCRIPTION}"),
            "extensionResourceId": lambda base, t, *n: resource_id(t, *n, prefix=base),
            "reference": self.reference,
            "not": lambda value: not value,
            "empty": lambda value: len(value) == 0,
        }

    # -- evaluation ----------------------------------------------------------------------------

    def parameter(self, name: str) -> Any:
        self.used_parameters.add(name)
        if name not in self._parameters:
            spec = self.data["parameters"].get(name)
            if spec is None:
                raise ExpressionError(f"parameters('{name}'): no such parameter")
            if name in self.values:
                value = self.values[name]
            elif "defaultValue" in spec:
                value = self.evaluate(spec["defaultValue"])
            else:
                raise ExpressionError(f"parameter {name} has no default and no value was given")
            self._parameters[name] = value
        return self._parameters[name]

    def variable(self, name: str) -> Any:
        self.used_variables.add(name)
        if name not in self._variables:
            if name not in self.data.get("variables", {}):
                raise ExpressionError(f"variables('{name}'): no such variable")
            self._variables[name] = self.evaluate(self.data["variables"][name])
        return self._variables[name]

    def reference(self, target: str, api_version: str | None = None, full: str | None = None) -> dict[str, Any]:
        """What reference() of a resource of this template returns after the deployment, as far as
        the template reads it: the endpoints of a storage account, the ids of an identity."""
        resource_type, names = split_id(target)
        resource = self.resource_by_id(target)
        if api_version != resource["apiVersion"]:
            raise ExpressionError(f"reference({target}) asks API {api_version}, the resource is {resource['apiVersion']}")
        name = names[-1]
        if resource_type == "Microsoft.Storage/storageAccounts":
            return {"primaryEndpoints": {s: f"https://{name}.{s}.core.windows.net/" for s in ("blob", "queue", "table", "file")}}
        if resource_type == "Microsoft.ManagedIdentity/userAssignedIdentities":
            return {"principalId": f"principal-of-{name}", "clientId": f"client-of-{name}"}
        if resource_type == "Microsoft.EventGrid/systemTopics" and full == "Full":
            return {"identity": {"principalId": f"principal-of-{name}"}, "properties": resource["properties"]}
        raise ExpressionError(f"reference() of {resource_type} (full={full}) is not modelled here")

    def evaluate(self, value: Any) -> Any:
        """``value`` with every expression in it evaluated (strings, lists and objects alike)."""
        if isinstance(value, dict):
            return {k: self.evaluate(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.evaluate(v) for v in value]
        if is_expression(value):
            return self.eval_node(parse(value[1:-1]))
        if isinstance(value, str) and value.startswith("[["):
            return value[1:]
        return value

    def eval_node(self, node: Any) -> Any:
        """One parsed expression (see parse) evaluated."""
        if isinstance(node, Call):
            function = self.functions.get(node.function)
            if function is None:
                raise ExpressionError(f"{node.function}() is not a function this check knows")
            return function(*(self.eval_node(a) for a in node.args))
        if isinstance(node, Access):
            target = self.eval_node(node.target)
            key = node.key if isinstance(node.key, str) else self.eval_node(node.key)
            try:
                return target[key]
            except (KeyError, IndexError, TypeError):
                raise ExpressionError(f"{key!r} is not in {target!r}") from None
        return node

    # -- resources -----------------------------------------------------------------------------

    @property
    def resources(self) -> list[dict[str, Any]]:
        """The resources deployed with these parameter values (a false ``condition`` drops one)."""
        return [r for r in self.data["resources"] if self.evaluate(r.get("condition", True)) is True]

    def resource_id_of(self, resource: dict[str, Any]) -> str:
        """A resource's full id: extension resources (a ``scope``) hang below their scope."""
        names = self.evaluate(resource["name"]).split("/")
        if "scope" in resource:
            scope = self.evaluate(resource["scope"])
            base = scope if scope.startswith("/") else f"{RESOURCE_GROUP_ID}/providers/{scope}"
            return resource_id(resource["type"], *names, prefix=base)
        return resource_id(resource["type"], *names)

    def resource_by_id(self, full_id: str) -> dict[str, Any]:
        for resource in self.resources:
            if self.resource_id_of(resource).lower() == full_id.lower():
                return resource
        raise ExpressionError(f"no resource of the template has the id {full_id}")

    def of_type(self, resource_type: str) -> list[dict[str, Any]]:
        return [r for r in self.resources if r["type"] == resource_type]

    def outputs(self) -> dict[str, Any]:
        return {name: self.evaluate(spec["value"]) for name, spec in self.data.get("outputs", {}).items()}


def expressions(value: Any) -> list[str]:
    """Every expression string anywhere in ``value``."""
    if isinstance(value, dict):
        return [e for v in value.values() for e in expressions(v)]
    if isinstance(value, list):
        return [e for v in value for e in expressions(v)]
    return [value] if is_expression(value) else []
