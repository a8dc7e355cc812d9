"""@tool schemas, argument validation and the calculator."""

import decimal
import sys
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moonlet.agent.tools import Tool, ToolError, calculator, default_tools, evaluate, tool, type_schema


@tool
def book_flight(origin: str, dest: str, seats: int = 1, cabin: Literal["economy", "business"] = "economy",
                flexible: bool = False, budget: float | None = None, stops: list[str] | None = None) -> dict:
    """Book a flight between two airports.

    More details that are not part of the description.

    Args:
        origin: IATA code of the departure airport.
        dest: IATA code of the arrival airport, e.g. "NRT".
        seats: how many seats
            (at most 9).
        cabin: the cabin class.
    Returns:
        the booking.
    """
    return {"route": f"{origin}-{dest}", "seats": seats, "cabin": cabin}


def test_schema_comes_from_type_hints_defaults_and_docstring():
    spec = book_flight.spec()
    assert spec["type"] == "function" and spec["function"]["name"] == "book_flight"
    assert spec["function"]["description"] == "Book a flight between two airports."
    p = spec["function"]["parameters"]
    assert p["required"] == ["origin", "dest"] and p["additionalProperties"] is False
    props = p["properties"]
    assert props["origin"] == {"type": "string", "description": "IATA code of the departure airport."}
    assert props["seats"] == {"type": "integer", "default": 1, "description": "how many seats (at most 9)."}
    assert props["cabin"]["enum"] == ["economy", "business"] and "description" in props["cabin"]
    assert props["flexible"] == {"type": "boolean", "default": False}
    assert props["budget"] == {"type": ["number", "null"]}
    assert props["stops"] == {"type": ["array", "null"], "items": {"type": "string"}}
    assert "Returns" not in str(props)


def test_type_schema_covers_nested_containers_and_refuses_unknown_types():
    assert type_schema(dict[str, list[int]]) == {"type": "object",
                                                 "additionalProperties": {"type": "array", "items": {"type": "integer"}}}
    assert type_schema(int | str) == {"anyOf": [{"type": "integer"}, {"type": "string"}]}
    with pytest.raises(TypeError, match="no JSON Schema"):
        type_schema(complex)
    with pytest.raises(TypeError, match="needs a type hint"):
        tool(lambda x: x)


@pytest.mark.parametrize("use_jsonschema", [True, False])
def test_a_whole_float_is_an_integer_argument_as_in_json_schema(use_jsonschema, monkeypatch):
    if not use_jsonschema:
        monkeypatch.setitem(sys.modules, "jsonschema", None)
    assert '"seats": 2,' in book_flight({"origin": "A", "dest": "B", "seats": 2.0})
    with pytest.raises(ToolError, match="seats"):
        book_flight({"origin": "A", "dest": "B", "seats": 2.5})


def test_calling_a_tool_validates_and_returns_a_string():
    out = book_flight({"origin": "HND", "dest": "NRT", "seats": 2})
    assert isinstance(out, str) and '"route": "HND-NRT"' in out
    assert book_flight('{"origin": "A", "dest": "B"}').startswith("{")  # a JSON string is accepted too


@pytest.mark.parametrize("use_jsonschema", [True, False])
@pytest.mark.parametrize("args, words", [
    ({"dest": "NRT"}, ["origin"]),
    ({"origin": "HND", "dest": "NRT", "seats": "two"}, ["seats", "integer"]),
    ({"origin": "HND", "dest": "NRT", "seats": True}, ["seats"]),
    ({"origin": "HND", "dest": "NRT", "cabin": "first"}, ["first"]),
    ({"origin": "HND", "dest": "NRT", "stops": ["ICN", 3]}, ["3"]),
    ({"origin": "HND", "dest": "NRT", "colour": "red"}, ["colour"]),
    (["HND", "NRT"], ["object"]),
])
def test_bad_arguments_raise_tool_error_naming_the_problem(args, words, use_jsonschema, monkeypatch):
    if not use_jsonschema:
        monkeypatch.setitem(sys.modules, "jsonschema", None)  # import fails -> the built-in validator
    with pytest.raises(ToolError) as e:
        book_flight(args)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_malformed_json_and_tool_exceptions_become_tool_errors():
    with pytest.raises(ToolError, match="not valid JSON"):
        book_flight('{"origin": ')

    @tool
    def broken(x: int) -> str:
        """Always fails."""
        return str(1 // (x - x))

    with pytest.raises(ToolError, match="broken failed: ZeroDivisionError"):
        broken({"x": 3})


def test_needs_approval_and_names_are_settable():
    @tool(name="rm", needs_approval=True, description="Delete a file.")
    def remove(path: str) -> str:
        return path

    assert isinstance(remove, Tool) and remove.name == "rm" and remove.needs_approval
    assert remove.spec()["function"]["description"] == "Delete a file."
    assert not calculator.needs_approval


@pytest.mark.parametrize("expr, want", [
    ("2 + 3 * 4", "14"), ("2^10", "1024"), ("7 // 2", "3"), ("-7 % 3", "2"), ("(17 * 23 + 4) / 7", "56.4285714285714"),
    ("0.1 + 0.2", "0.3"), ("2**100", str(2**100)), ("factorial(25)", "15511210043330985984000000"),
    ("sqrt(16) + log10(1000)", "7"), ("round(pi, 4)", "3.1416"), ("max(3, 9, -1)", "9"), ("1e3 / 4", "250"),
])
def test_calculator_computes_exact_values(expr, want):
    assert calculator({"expression": expr}) == want


@pytest.mark.parametrize("expr, msg", [
    ("__import__('os').system('true')", "unsupported"), ("open('/etc/passwd')", "unsupported"),
    ("(1).__class__", "unsupported"), ("[x for x in range(9)]", "unsupported"), ("lambda: 1", "unsupported"),
    ("9**9**9", "too large"), ("factorial(10**6)", "too large"), ("factorial(19999)", "too large"), ("1/0", "ZeroDivisionError"),
    ("sqrt(-1)", "ValueError"), ("2 +", "cannot parse"), ("x + 1", "unsupported"), ("1" * 20_000, "too long"),
])
def test_calculator_refuses_code_and_runaway_results_with_tool_errors(expr, msg):
    with pytest.raises(ToolError, match=msg):
        calculator({"expression": expr})


_int = st.integers(-10**6, 10**6).map(str)
_expr = st.recursive(_int, lambda e: st.tuples(e, st.sampled_from(["+", "-", "*"]), e).map(
    lambda t: f"({t[0]} {t[1]} {t[2]})"), max_leaves=12)


@settings(max_examples=100, deadline=None)
@given(_expr)
def test_calculator_agrees_with_python_on_integer_arithmetic(expr):
    assert evaluate(expr) == eval(expr)  # the expression is ours, built from digits and + - * only


def test_calculator_prints_integers_of_any_size_it_allows():
    """CPython's str() refuses ints over 4300 digits; the calculator allows up to 100,000 bits."""
    assert calculator({"expression": "2**20000"}) == str(decimal.Decimal(2**20000))
    assert len(calculator({"expression": "factorial(5000)"})) == 16326
    with pytest.raises(ToolError, match=r"too large: \d+\.\.\.\(6021 characters\)"):
        calculator({"expression": "(2**20000)**10"})


def test_default_tools_are_calculator_and_python_plus_search_with_an_index(tmp_path):
    assert [t.name for t in default_tools()] == ["calculator", "python"]
    from moonlet.agent.search import build_index

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.md").write_text("# A\n\nhello")
    build_index(tmp_path / "d", tmp_path / "i.sqlite")
    names = [t.name for t in default_tools(str(tmp_path / "i.sqlite"), python=False)]
    assert names == ["calculator", "search", "open"]
