"""Tools the agent can call: a typed Python function becomes a Tool with a JSON Schema.

    @tool
    def calculator(expression: str) -> str:
        '''Evaluate an arithmetic expression.

        Args:
            expression: e.g. "2**10 / (3 + 4)".
        '''

The schema comes from the type hints (str, int, float, bool, list[...], dict, Literal[...], X | None)
and the docstring (first paragraph = description, "Args:" lines = parameter descriptions). Calling a
Tool validates the arguments against its schema (with `jsonschema` when installed, else the small
validator below, which covers every schema @tool generates) and always returns a string; anything that
goes wrong is a ToolError whose message is written for the model, so the loop sends it back as the
tool result instead of crashing.
"""

from __future__ import annotations

import ast
import decimal
import inspect
import json
import math
import operator
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal


class ToolError(Exception):
    """A tool failed; str(e) is sent to the model as the tool result."""


# ------------------------------------------------------------------------------------ schema from types

_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array"}


def type_schema(tp: Any) -> dict:
    """JSON Schema for a Python type hint."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in _SCALARS:
        return {"type": _SCALARS[tp]}
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        inner = type_schema(rest[0]) if len(rest) == 1 else {"anyOf": [type_schema(a) for a in rest]}
        if len(rest) < len(args):  # Optional: also accept null
            if "type" in inner:
                return {**inner, "type": [inner["type"], "null"]}
            return {"anyOf": [inner, {"type": "null"}]}
        return inner
    if origin in (list, tuple, set, frozenset) or tp in (tuple, set):
        item = args[0] if args and args[0] is not Ellipsis else None
        return {"type": "array", **({"items": type_schema(item)} if item is not None else {})}
    if origin is dict:
        return {"type": "object", **({"additionalProperties": type_schema(args[1])} if args else {})}
    raise TypeError(f"@tool: no JSON Schema for type {tp!r}; use str, int, float, bool, list, dict or Literal")


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(description, {arg: description}) from a Google-style docstring."""
    doc = inspect.cleandoc(doc or "")
    head, _, rest = doc.partition("\nArgs:")
    args: dict[str, str] = {}
    name = None
    for line in rest.splitlines():
        m = re.match(r"\s{0,8}(\w+)\s*(?:\([^)]*\))?:\s*(.*)", line)
        if m and not line.startswith(" " * 9):
            name, args[m.group(1)] = m.group(1), m.group(2).strip()
        elif name and line.strip():
            if re.match(r"\S", line):  # a new unindented section (Returns:, ...) ends Args
                break
            args[name] = (args[name] + " " + line.strip()).strip()
    return " ".join(head.split("\n\n")[0].split()), args


# --------------------------------------------------------------------------------------------- validation

_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict,
               "array": list, "null": type(None)}


def _check(value: Any, schema: dict, path: str) -> str | None:
    """First schema violation as a message, or None. Covers what type_schema() emits."""
    if "anyOf" in schema:
        errs = [_check(value, s, path) for s in schema["anyOf"]]
        return None if any(e is None for e in errs) else errs[0]
    if "enum" in schema and value not in schema["enum"]:
        return f"{path} must be one of {schema['enum']}, got {value!r}"
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        whole = isinstance(value, float) and value.is_integer()  # JSON Schema: 2.0 is an integer
        ok = any((isinstance(value, _JSON_TYPES[t]) or (t == "integer" and whole))
                 and not (isinstance(value, bool) and t in ("integer", "number")) for t in names)
        if not ok:
            return f"{path} must be {' or '.join(names)}, got {type(value).__name__} {value!r:.60}"
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            if err := _check(v, schema["items"], f"{path}[{i}]"):
                return err
    if isinstance(value, dict):
        for req in schema.get("required", []):
            if req not in value:
                return f"missing required argument {req!r}" if path == "arguments" else f"{path} needs {req!r}"
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for k, v in value.items():
            if k in props:
                sub = props[k]
            elif extra is False:
                return f"unknown argument {k!r}; expected {sorted(props)}" if path == "arguments" else \
                    f"{path} has unknown key {k!r}"
            elif isinstance(extra, dict):
                sub = extra
            else:
                continue
            if err := _check(v, sub, f"{path}.{k}" if path != "arguments" else repr(k)):
                return err
    return None


def validate(arguments: Any, schema: dict) -> None:
    """Raise ToolError naming the first argument that does not fit `schema`."""
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    if jsonschema is not None:
        err = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(arguments))
        if err is not None:
            where = "/".join(map(str, err.absolute_path))
            raise ToolError(f"invalid arguments{f' at {where!r}' if where else ''}: {err.message}")
        return
    if err := _check(arguments, schema, "arguments"):
        raise ToolError(f"invalid arguments: {err}")


# ------------------------------------------------------------------------------------------------- Tool

@dataclass
class Tool:
    name: str
    description: str
    parameters: dict  # JSON Schema of the arguments object
    fn: Callable[..., Any] = field(repr=False)
    needs_approval: bool = False  # the loop asks the user before running it

    @classmethod
    def from_function(cls, fn: Callable, name: str | None = None, description: str | None = None,
                      needs_approval: bool = False) -> Tool:
        desc, arg_docs = parse_docstring(fn.__doc__)
        hints = typing.get_type_hints(fn)
        props, required = {}, []
        for p in inspect.signature(fn).parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TypeError(f"@tool {fn.__name__}: *args/**kwargs cannot be described by a schema")
            if p.name not in hints:
                raise TypeError(f"@tool {fn.__name__}: parameter {p.name!r} needs a type hint")
            props[p.name] = type_schema(hints[p.name])
            if p.name in arg_docs:
                props[p.name]["description"] = arg_docs[p.name]
            if p.default is p.empty:
                required.append(p.name)
            elif p.default is not None:
                props[p.name]["default"] = p.default
        params = {"type": "object", "properties": props, "required": required, "additionalProperties": False}
        return cls(name or fn.__name__, description or desc, params, fn, needs_approval)

    def spec(self) -> dict:
        """The OpenAI tools-list entry."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def __call__(self, arguments: dict | str | None = None) -> str:
        if arguments is None or arguments == "":
            arguments = {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as e:
                raise ToolError(f"the arguments are not valid JSON ({e.msg} at char {e.pos})") from None
        validate(arguments, self.parameters)
        props = self.parameters.get("properties", {})  # JSON Schema counts 1.0 as an integer; Python does not
        arguments = {k: int(v) if isinstance(v, float) and props.get(k, {}).get("type") == "integer" else v
                     for k, v in arguments.items()}
        try:
            out = self.fn(**arguments)
        except ToolError:
            raise
        except Exception as e:  # a tool bug must reach the model as an error, not crash the loop
            raise ToolError(f"{self.name} failed: {type(e).__name__}: {e}") from e
        return out if isinstance(out, str) else json.dumps(out, ensure_ascii=False, default=str)


def tool(fn: Callable | None = None, *, name: str | None = None, description: str | None = None,
         needs_approval: bool = False):
    """Decorator: `@tool` or `@tool(name=..., needs_approval=True)` turns a typed function into a Tool."""
    make = lambda f: Tool.from_function(f, name=name, description=description, needs_approval=needs_approval)
    return make(fn) if fn is not None else make


# ------------------------------------------------------------------------------------------- calculator

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNOPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCS = {"sqrt": math.sqrt, "exp": math.exp, "log": math.log, "log2": math.log2, "log10": math.log10,
          "sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin, "acos": math.acos,
          "atan": math.atan, "atan2": math.atan2, "sinh": math.sinh, "cosh": math.cosh, "tanh": math.tanh,
          "floor": math.floor, "ceil": math.ceil, "abs": abs, "round": round, "min": min, "max": max,
          "factorial": math.factorial, "gcd": math.gcd, "lcm": math.lcm, "comb": math.comb, "perm": math.perm,
          "hypot": math.hypot, "degrees": math.degrees, "radians": math.radians}
_CONSTS = {"pi": math.pi, "e": math.e, "tau": math.tau, "inf": math.inf}
_MAX_BITS = 100_000  # results bigger than this are refused, so "9**9**9" cannot eat the machine


def _big(x: Any) -> bool:
    return isinstance(x, int) and x.bit_length() > _MAX_BITS


def _eval(node: ast.AST) -> Any:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, complex):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTS:
        return _CONSTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNOPS:
        return _UNOPS[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and isinstance(a, int) and isinstance(b, int) and abs(a) > 1 \
                and b * math.log2(abs(a)) > _MAX_BITS:
            raise ToolError(f"result too large: {_short(_fmt(a))}**{_short(_fmt(b))} has more than {_MAX_BITS} bits")
        out = _BINOPS[type(node.op)](a, b)
        if _big(out):
            raise ToolError(f"result too large (more than {_MAX_BITS} bits)")
        return out
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS \
            and not node.keywords:
        args = [_eval(a) for a in node.args]
        if node.func.id in ("factorial", "comb", "perm") and any(isinstance(a, int) and a > 20_000 for a in args):
            raise ToolError(f"{node.func.id} argument too large (max 20000)")
        out = _FUNCS[node.func.id](*args)
        if _big(out):
            raise ToolError(f"result too large (more than {_MAX_BITS} bits)")
        return out
    what = ast.unparse(node) if hasattr(ast, "unparse") else type(node).__name__
    raise ToolError(f"unsupported expression {what!r}: use numbers, + - * / // % **, parentheses, "
                    f"constants {sorted(_CONSTS)} and functions {sorted(_FUNCS)}")


def _fmt(x: Any) -> str:
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, float):
        return str(int(x)) if x.is_integer() and abs(x) < 1e16 else format(x, ".15g")
    if isinstance(x, int):  # str() refuses ints over 4300 digits (CPython's guard against quadratic str());
        return str(decimal.Decimal(x))  # ours stop at _MAX_BITS, and Decimal prints them in linear time
    return str(x)


def _short(text: str, n: int = 120) -> str:
    """An operand or an expression as an error message shows it: a 30,000-digit number is not a message."""
    return text if len(text) <= n else f"{text[: n // 2]}...({len(text)} characters)...{text[-n // 4:]}"


def evaluate(expression: str) -> Any:
    """The value of an arithmetic expression, computed from its AST (never eval)."""
    if len(expression) > 10_000:
        raise ToolError("expression too long (max 10000 characters)")
    try:
        tree = ast.parse(expression.strip().replace("^", "**"), mode="eval")
    except (SyntaxError, ValueError) as e:  # ValueError: an integer literal of over 4300 digits
        raise ToolError(f"cannot parse {_short(repr(expression))}: {getattr(e, 'msg', e)}") from None
    try:
        return _eval(tree)
    except (ArithmeticError, ValueError, TypeError) as e:
        raise ToolError(f"cannot evaluate {_short(repr(expression))}: {type(e).__name__}: {e}") from None


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression and return the result: integers exactly (up to 100,000 bits),
    decimals to 15 significant digits.

    Args:
        expression: e.g. "(17 * 23 + 4) / 7", "2**64 % 1000", "sqrt(2) * pi", "factorial(20)".
            Supports + - * / // % ** (^ means **), parentheses, pi, e and common math functions.
    """
    return _fmt(evaluate(expression))


def default_tools(index_path: str | None = None, *, python: bool = True, sandbox_limits: Any = None) -> list[Tool]:
    """calculator, the sandboxed python tool, and search/open when an index is given."""
    tools = [calculator]
    if python:
        from moonlet.agent.sandbox import python_tool

        tools.append(python_tool(sandbox_limits))
    if index_path is not None:
        from moonlet.agent.search import search_tools

        tools += search_tools(index_path)
    return tools
