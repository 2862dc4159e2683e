"""Constrained decoding end to end on a tiny random model (garbage text, which is the point: the constraint
must hold anyway), in mixed batches with n > 1, chunked prefill and preemption forced by a tiny KV pool."""

import json
import re
import time

import jsonschema
import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.engine.outputs import ModelOutput, SampledToken
from tokenmill.engine.request import EngineCoreRequest
from tokenmill.sampling_params import StructuredOutputsParams as S

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}}, "required": ["kind"]},
    },
    "required": ["name", "age", "tags", "pet"],
}
REGEX = r"[a-z]{2,5}@[a-z]{2,4}\.(com|org)"
GRAMMAR = 'root ::= "SELECT " col (", " col){0,2} " FROM t"\ncol ::= [a-z] [a-z]? [a-z]?'
GRAMMAR_RE = r"SELECT [a-z]{1,3}(, [a-z]{1,3}){0,2} FROM t"
CHOICES = ['say "hi"', "back\\slash", "no"]
MAX_WS = 8


def _check_json(text: str, schema: dict | None) -> None:
    value = json.loads(text)
    if schema is None:
        assert isinstance(value, dict)
    else:
        jsonschema.validate(value, schema)
    assert not re.search(rf"\s{{{MAX_WS + 1},}}", text), "whitespace run longer than the bound"


def _constraints() -> list[tuple[S, object]]:
    """(constraint, check(text))."""
    return [
        (S(json=SCHEMA), lambda t: _check_json(t, SCHEMA)),
        (S(json=SCHEMA, disable_any_whitespace=True), lambda t: (_check_json(t, SCHEMA), " " not in t.replace('" ', ""))),
        (S(json_object=True), lambda t: _check_json(t, None)),
        (S(regex=REGEX), lambda t: re.fullmatch(REGEX, t) or pytest.fail(t)),
        (S(choice=CHOICES), lambda t: t in CHOICES or pytest.fail(t)),
        (S(grammar=GRAMMAR), lambda t: re.fullmatch(GRAMMAR_RE, t) or pytest.fail(t)),
    ]


def _prompts(n: int, length: int) -> list[list[int]]:
    return [[6 + (i * 37 + j * 11) % 500 for j in range(length)] for i in range(n)]


CASES = {
    "plain": {"block_size": 16, "max_num_batched_tokens": 2048},
    "chunked_prefill": {"block_size": 4, "max_num_batched_tokens": 24, "enable_chunked_prefill": True},
    "preemption": {"block_size": 4, "max_num_batched_tokens": 64, "num_gpu_blocks_override": 48},
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_kind_holds_in_mixed_batches(case, tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", max_model_len=512, **CASES[case])
    kinds = _constraints()
    params, checks = [], []
    for i, (so, check) in enumerate(kinds):
        params.append(SamplingParams(n=2, temperature=1.0, seed=i, max_tokens=480, structured_outputs=so))
        checks.append(check)
        params.append(SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))  # an unconstrained neighbour
        checks.append(None)
    outs = llm.generate(_prompts(len(params), 20), params)
    for out, check in zip(outs, checks):
        for o in out.outputs:
            if check is None:
                assert o.finish_reason == "length" and len(o.token_ids) == 24
                continue
            assert o.finish_reason == "stop", (o.finish_reason, o.text)
            check(o.text)
    stats = llm.engine.stats()
    assert stats.num_constrained_requests == len(kinds)
    assert stats.num_grammar_compiles == len(kinds) and stats.num_waiting_for_grammar == 0
    if case == "preemption":
        assert stats.num_preemptions > 0, "the tiny KV pool did not force a preemption"
    assert llm.all_blocks_free()


def test_unconstrained_greedy_tokens_unchanged_by_constrained_neighbours(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", max_model_len=512, block_size=4, max_num_batched_tokens=32)
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    prompts = _prompts(4, 12)
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts[:2], greedy)]
    mixed_params = [greedy, SamplingParams(seed=1, max_tokens=300, structured_outputs=S(json=SCHEMA)),
                    greedy, SamplingParams(temperature=0.0, max_tokens=300, structured_outputs=S(regex=REGEX))]
    mixed = llm.generate([prompts[0], prompts[2], prompts[1], prompts[3]], mixed_params)
    assert [mixed[0].outputs[0].token_ids, mixed[2].outputs[0].token_ids] == alone


def test_compile_timeout_fails_only_the_constrained_request(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", max_model_len=256, grammar_compile_timeout_s=1e-9)
    outs = llm.generate(_prompts(2, 8), [SamplingParams(max_tokens=50, structured_outputs=S(json=SCHEMA)),
                                          SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)])
    assert outs[0].outputs[0].finish_reason == "error" and outs[0].outputs[0].token_ids == []
    assert outs[1].outputs[0].finish_reason == "length" and len(outs[1].outputs[0].token_ids) == 5
    assert llm.engine.stats().num_grammar_compile_failures == 1


def test_invalid_constraint_in_core_fails_request_not_engine(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", max_model_len=256)
    bad = SamplingParams(n=2, max_tokens=20, structured_outputs=S(grammar='root ::= "a" | b'))
    outs = llm.generate(_prompts(2, 8), [bad, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)])
    assert [o.finish_reason for o in outs[0].outputs] == ["error", "error"]
    assert outs[1].outputs[0].finish_reason == "length"


def test_abort_cancels_pending_compile(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", max_model_len=256)
    core = llm.engine
    params = SamplingParams(n=2, max_tokens=50, structured_outputs=S(json=SCHEMA))
    core.add_request(EngineCoreRequest("c", _prompts(1, 8)[0], params, eos_token_ids=[2]))
    assert core.scheduler.grammar_waiting and core.stats().num_waiting_for_grammar == 2
    core.abort(["c"])
    assert core.scheduler.structured.num_pending == 0 and not core.scheduler.grammar_waiting
    assert not core.has_unfinished()
    assert core.step() == []


def _schedule_until_running(core, seq_id: str):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        sched = core.scheduler.schedule()
        if any(s.seq_id == seq_id for s in sched.seqs):
            return sched
        core.scheduler.wait_for_grammars(0.05)
    raise AssertionError("never scheduled")


def test_rejected_token_ends_sequence_with_error(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", max_model_len=256)
    core, tok = llm.engine, llm.get_tokenizer()
    core.add_request(EngineCoreRequest("r", _prompts(1, 8)[0], SamplingParams(structured_outputs=S(regex="a+")),
                                       eos_token_ids=[2]))
    sched = _schedule_until_running(core, "r#0")
    assert sched.grammar_bitmask is not None and sched.grammar_bitmask.indices == [0]
    ok = tok.encode("a", add_special_tokens=False)[0]
    assert core.scheduler.update(sched, ModelOutput([SampledToken("r#0", ok)]))[0].new_token_ids == [ok]
    sched = core.scheduler.schedule()
    bad = tok.encode("z", add_special_tokens=False)[0]
    (delta,) = core.scheduler.update(sched, ModelOutput([SampledToken("r#0", bad)]))
    assert delta.finish_reason == "error" and delta.new_token_ids == []
    assert f"token {bad}" in delta.error and "does not fit the grammar" in delta.error
    assert not core.has_unfinished()
