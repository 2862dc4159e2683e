"""validate(): what the server calls before a constraint reaches the engine core."""

import pytest

from tokenmill.sampling_params import StructuredOutputsParams as S
from tokenmill.structured_output import validate


@pytest.mark.parametrize("params", [
    S(json={"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}}),
    S(json={"$defs": {"p": {"type": "string"}}, "type": "array", "items": {"$ref": "#/$defs/p"}}),
    S(json={"type": "object", "properties": {"not": {"type": "string"}}}),  # a property named like a keyword
    S(json_object=True),
    S(json=True),
    S(regex=r"[a-z]{2,5}@[a-z]+\.(com|org)"),
    S(choice=['say "hi"', "back\\slash", "日本"]),
    S(grammar='root ::= "SELECT " col (", " col){0,2}\ncol ::= [a-z]+'),
])
def test_valid_constraints_pass(params):
    validate(params)


@pytest.mark.parametrize(("params", "field", "detail"), [
    (S(json={"type": "strang"}), "structured_outputs.json", "strang"),
    (S(json={"$ref": "#/defs/missing"}), "structured_outputs.json", "defs"),
    (S(json={"not": {"type": "string"}}), "structured_outputs.json", "'not' at #"),
    (S(json={"type": "array", "uniqueItems": True}), "structured_outputs.json", "uniqueItems"),
    (S(regex="a(b"), "structured_outputs.regex", "parenthesis"),
    (S(regex="(?<=a)b"), "structured_outputs.regex", "Lookbehind"),
    (S(grammar='root ::= "a" | b'), "structured_outputs.grammar", 'Rule "b" is not defined'),
])
def test_invalid_constraints_name_the_field(params, field, detail):
    with pytest.raises(ValueError) as e:
        validate(params)
    msg = str(e.value)
    assert msg.startswith(f"invalid {field}"), msg
    assert detail in msg
    assert "/project/" not in msg  # xgrammar's C++ source location is stripped
