"""Engine-level sampling behaviour through LLM: seeds, stop strings, min_tokens, n>1, penalties, logit_bias."""

import pytest

from tokenmill import SamplingParams

P1 = list(range(40, 60))
P2 = [7, 300, 12, 99, 45, 250, 31]
P3 = list(range(200, 213))


def _gen(llm, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert llm.all_blocks_free(), "blocks leaked"
    return outs


def test_seeded_sampling_reproducible_and_independent_of_batch_mates(llama_llm):
    sp = SamplingParams(temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    alone = _gen(llama_llm, [P1], sp)[0].outputs[0].token_ids
    again = _gen(llama_llm, [P1], sp)[0].outputs[0].token_ids
    mates = _gen(llama_llm, [P2, P1, P3], [SamplingParams(temperature=0.7, max_tokens=5), sp,
                                          SamplingParams(temperature=1.0, seed=9, max_tokens=20, ignore_eos=True)])
    assert alone == again == mates[1].outputs[0].token_ids
    other_seed = _gen(llama_llm, [P1], SamplingParams(temperature=1.0, seed=4321, max_tokens=12, ignore_eos=True))
    assert other_seed[0].outputs[0].token_ids != alone


def test_n_samples_distinct_reproducible_and_share_prompt_blocks(llama_llm):
    sp = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True)
    hits0 = llama_llm.engine.stats().prefix_cache_hits
    prompt = list(range(300, 318))  # 18 tokens: 4 full blocks of 4
    a = _gen(llama_llm, [prompt], sp)[0]
    hits = llama_llm.engine.stats().prefix_cache_hits - hits0
    assert hits >= 2 * 16  # samples 1 and 2 reuse sample 0's full prompt blocks
    assert [c.index for c in a.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 and c.finish_reason == "length" for c in a.outputs)
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1
    b = _gen(llama_llm, [prompt], sp)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]


def test_stop_strings_cut_text(llama_llm):
    base = _gen(llama_llm, [P3], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].outputs[0]
    text = base.text
    assert len(text) > 8
    stop = text[4:7]
    cut = text.find(stop)
    out = _gen(llama_llm, [P3], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert out.text == text[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    assert len(out.token_ids) < len(base.token_ids)
    inc = _gen(llama_llm, [P3], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop],
                                               include_stop_str_in_output=True))[0].outputs[0]
    assert inc.text == text[:cut + len(stop)]


def test_stop_token_ids_and_min_tokens(llama_llm):
    base = _gen(llama_llm, [P1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0].token_ids
    tok = base[3]
    first = base.index(tok)
    out = _gen(llama_llm, [P1], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[tok]))[0].outputs[0]
    assert out.token_ids == base[:first + 1] and out.finish_reason == "stop" and out.stop_reason == tok
    m = first + 3
    out = _gen(llama_llm, [P1], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[tok],
                                               min_tokens=m))[0].outputs[0]
    assert len(out.token_ids) >= m
    assert tok not in out.token_ids[:m]  # not sampled (nor stopping) before min_tokens


def test_repetition_penalty_matches_transformers(llama_llm, llama_ref):
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, repetition_penalty=1.8)
    out = _gen(llama_llm, [P2], sp)[0].outputs[0].token_ids
    assert out == llama_ref.greedy(P2, 10, repetition_penalty=1.8)
    assert out != llama_ref.greedy(P2, 10)


@pytest.mark.parametrize("freq,pres", [(1.5, 0.0), (0.0, 1.5), (0.8, 0.8)])
def test_frequency_presence_penalties_match_reference_loop(llama_llm, llama_ref, freq, pres):
    """Reference: vLLM's rule, logits -= freq * count + pres * (count > 0) over generated tokens."""
    ids, gen = list(P1), []
    for _ in range(8):
        logits = llama_ref.logits(ids)
        for t in set(gen):
            logits[t] -= freq * gen.count(t) + pres
        nxt = int(logits.argmax())
        gen.append(nxt)
        ids.append(nxt)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, frequency_penalty=freq, presence_penalty=pres)
    assert _gen(llama_llm, [P1], sp)[0].outputs[0].token_ids == gen


def test_logit_bias(llama_llm):
    forced = _gen(llama_llm, [P2], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                                                  logit_bias={123: 100.0}))[0].outputs[0].token_ids
    assert forced == [123] * 5
    base = _gen(llama_llm, [P2], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0].outputs[0].token_ids
    banned = _gen(llama_llm, [P2], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True,
                                                  logit_bias={base[0]: -100.0}))[0].outputs[0].token_ids
    assert banned[0] != base[0]


def test_logprobs_shape(llama_llm):
    out = _gen(llama_llm, [P2], SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True))[0].outputs[0]
    assert len(out.logprobs) == 4
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert tok in lp and lp[tok].rank == 1  # greedy picks the top token
        assert len(lp) == 3 and all(v.logprob <= 0 for v in lp.values())
    assert out.cumulative_logprob == pytest.approx(sum(lp[t].logprob for t, lp in zip(out.token_ids, out.logprobs)))


@pytest.mark.parametrize("kw,field", [({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
                                      ({"max_tokens": 0}, "max_tokens"), ({"n": 0}, "n"),
                                      ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
                                      ({"logit_bias": {1: 500.0}}, "logit_bias")])
def test_invalid_sampling_params_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


def test_abort_frees_blocks_within_a_step(llama_llm):
    from tokenmill.engine.request import EngineCoreRequest

    core = llama_llm.engine
    core.add_request(EngineCoreRequest("abort-me", P1, SamplingParams(max_tokens=50, ignore_eos=True), eos_token_ids=[2]))
    core.add_request(EngineCoreRequest("keep", P2, SamplingParams(max_tokens=3, ignore_eos=True), eos_token_ids=[2]))
    core.step()
    core.step()
    assert core.stats().kv_cache_usage > 0
    core.abort(["abort-me"])
    assert core.stats().num_running == 1
    deltas = []
    while core.has_unfinished():
        deltas += core.step()
    assert {d.request_id for d in deltas} == {"keep"}
    assert core.all_blocks_free()


def test_stop_token_and_eos_text_left_out_unless_asked(llama_llm):
    """vLLM semantics: the token that stopped the sequence stays in token_ids but not in the text."""
    base = _gen(llama_llm, [P1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0].token_ids
    tok = base[3]
    first = base.index(tok)
    before = _gen(llama_llm, [P1], SamplingParams(temperature=0, max_tokens=first, ignore_eos=True))
    upto = _gen(llama_llm, [P1], SamplingParams(temperature=0, max_tokens=first + 1, ignore_eos=True))
    out = _gen(llama_llm, [P1], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[tok]))[0].outputs[0]
    assert out.token_ids == base[:first + 1] and out.stop_reason == tok
    assert out.text == (before[0].outputs[0].text if first else "")
    kept = _gen(llama_llm, [P1], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[tok],
                                                include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == upto[0].outputs[0].text != out.text
    # EOS forced at once: even with special tokens shown, its text is not part of the output
    eos = llama_llm.get_tokenizer().eos_token_id
    forced = SamplingParams(temperature=0, max_tokens=4, logit_bias={eos: 100.0}, skip_special_tokens=False)
    out = _gen(llama_llm, [P1], forced)[0].outputs[0]
    assert out.token_ids == [eos] and out.finish_reason == "stop" and out.stop_reason is None and out.text == ""
