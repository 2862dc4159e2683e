"""Batch input validation: every bad-input case fails the whole file with OpenAI's line-numbered errors."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.batch.validate import BatchValidationError, validate_file
from tokenmill.config import BatchConfig

EP = "/v1/chat/completions"


def line(cid: str, url: str = EP, **kw) -> str:
    obj = {"custom_id": cid, "method": "POST", "url": url, "body": {"messages": [{"role": "user", "content": "hi"}]}}
    obj.update(kw)
    return json.dumps(obj)


def errors_of(tmp_path, text: str, endpoint: str = EP, **cfg) -> list[dict]:
    path = tmp_path / "in.jsonl"
    path.write_text(text)
    with pytest.raises(BatchValidationError) as info:
        validate_file(path, endpoint, BatchConfig(**cfg))
    body = info.value.to_json()
    assert body["object"] == "list"
    assert all(set(e) == {"code", "message", "param", "line"} for e in body["data"])
    return body["data"]


def test_valid_file_keeps_order_and_line_numbers(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(line("a") + "\n\n" + line("b") + "\n")  # a blank line is skipped but keeps its number
    lines = validate_file(path, EP, BatchConfig())
    assert [(x.line, x.custom_id) for x in lines] == [(1, "a"), (3, "b")]


@pytest.mark.parametrize(("text", "code", "param", "bad_line"), [
    (line("a") + "\n{not json\n", "invalid_json_line", None, 2),
    (line("a") + "\n[1, 2]\n", "invalid_json_line", None, 2),
    (json.dumps({"method": "POST", "url": EP, "body": {}}) + "\n", "missing_required_parameter", "custom_id", 1),
    (json.dumps({"custom_id": "a", "method": "POST", "url": EP}) + "\n", "missing_required_parameter", "body", 1),
    (json.dumps({"custom_id": "a", "method": "POST", "url": EP, "body": "x"}) + "\n", "invalid_parameter", "body", 1),
    (line("a") + "\n" + line("b") + "\n" + line("a") + "\n", "duplicate_custom_id", "custom_id", 3),
    (line("a", url="/v1/completions") + "\n", "invalid_url", "url", 1),
    (line("a", method="GET") + "\n", "invalid_parameter", "method", 1),
    (line("a", body={"messages": [], "stream": True}) + "\n", "invalid_parameter", "body.stream", 1),
    (line("a", extra=1) + "\n", "invalid_parameter", "extra", 1),
    (line("") + "\n", "invalid_parameter", "custom_id", 1),
    (b"\xff\xfe\n".decode("latin-1"), "invalid_json_line", None, 1),
])
def test_each_bad_line_fails_the_file_with_its_number(tmp_path, text, code, param, bad_line):
    [err] = errors_of(tmp_path, text)
    assert (err["code"], err["param"], err["line"]) == (code, param, bad_line)
    assert f"Line {bad_line}" in err["message"]


def test_unsupported_endpoint_empty_and_oversize_files(tmp_path):
    [err] = errors_of(tmp_path, line("a") + "\n", endpoint="/v1/images")
    assert (err["code"], err["param"]) == ("invalid_endpoint", "endpoint")
    [err] = errors_of(tmp_path, "\n\n")
    assert err["code"] == "empty_file"
    [err] = errors_of(tmp_path, line("a") + "\n", max_file_bytes=10)
    assert err["code"] == "file_too_large" and "10 bytes" in err["message"]
    errs = errors_of(tmp_path, "".join(line(f"c{i}") + "\n" for i in range(4)), max_lines=3)
    assert errs[-1]["code"] == "too_many_requests" and errs[-1]["line"] == 4


def test_error_list_is_capped_but_names_the_first_lines(tmp_path):
    errs = errors_of(tmp_path, "x\n" * 20, max_listed_errors=5)
    assert [e["line"] for e in errs] == [1, 2, 3, 4, 5]


_KINDS = st.sampled_from(["ok", "json", "url", "dup", "nobody"])


@settings(max_examples=60, deadline=None)
@given(kinds=st.lists(_KINDS, max_size=25))
def test_errors_name_exactly_the_bad_lines(tmp_path_factory, kinds):
    """Property: a file of good and bad lines fails listing exactly the bad lines, in order; all good passes."""
    kinds = ["ok", *kinds]  # line 1 is good: "dup" lines reuse its custom_id
    bad = [num for num, kind in enumerate(kinds, start=1) if kind != "ok"]
    text = {"json": lambda n: "{oops", "url": lambda n: line(f"id{n}", url="/v1/embeddings"),
            "dup": lambda n: line("id1"), "ok": lambda n: line(f"id{n}"),
            "nobody": lambda n: json.dumps({"custom_id": f"id{n}", "method": "POST", "url": EP})}
    path = tmp_path_factory.mktemp("v") / "in.jsonl"
    path.write_text("\n".join(text[k](n) for n, k in enumerate(kinds, start=1)) + "\n")
    if bad:
        with pytest.raises(BatchValidationError) as info:
            validate_file(path, EP, BatchConfig())
        assert [e.line for e in info.value.errors] == bad
    else:
        assert [x.custom_id for x in validate_file(path, EP, BatchConfig())] == [f"id{n}" for n in range(1, len(kinds) + 1)]
