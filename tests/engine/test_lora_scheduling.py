"""Multi-LoRA in the scheduler (torch-free): the max_loras admission cap, per-adapter stats, prefix-cache
isolation between adapters, and the vLLM-named engine arguments."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.config import CacheConfig, LoRAConfig, SchedulerConfig
from tokenmill.engine.args import engine_config, lora_config, parse_lora_module
from tokenmill.engine.outputs import KVCacheGroupSpec
from tokenmill.engine.scheduler import Scheduler
from tokenmill.lora.request import LoRARequest

from .helpers import drain, req, run_step


def lora_scheduler(max_loras: int = 2, budget: int = 64, max_num_seqs: int = 8, num_blocks: int = 64,
                   lora: bool = True) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget),
                     CacheConfig(block_size=4), [KVCacheGroupSpec(layer_ids=[0])], [num_blocks], 256,
                     vocab_size=1000, lora=LoRAConfig(max_loras=max_loras) if lora else None)


def lreq(rid: str, lora_id: int, prompt: list[int] | None = None, max_tokens: int = 3):
    r = req(rid, prompt or [10, 11, 12], max_tokens=max_tokens)
    if lora_id:
        r.lora_request = LoRARequest(f"ad{lora_id}", lora_id, f"/adapters/{lora_id}").to_wire()
    return r


def running_loras(s: Scheduler) -> set[int]:
    return {q.lora_id for q in s.running if q.lora_id}


def test_cold_adapter_waits_without_blocking_base_or_running_adapters():
    s = lora_scheduler(max_loras=2)
    for rid, lid in (("a", 1), ("b", 2), ("c", 3), ("base", 0), ("a2", 1)):
        s.add_request(lreq(rid, lid))
    out, _ = run_step(s)
    # c's adapter would be a third one: skipped; base and a second request for adapter 1 go ahead of it
    assert [(x.seq_id, x.lora_id) for x in out.seqs] == [("a#0", 1), ("b#0", 2), ("base#0", 0), ("a2#0", 1)]
    assert [q.seq_id for q in s.waiting] == ["c#0"]
    stats = s.stats()
    assert stats.lora_running == ["ad1", "ad2"] and stats.lora_waiting == ["ad3"]
    assert stats.lora_requests == {"ad1": 2, "ad2": 1, "ad3": 1}
    # c runs once adapter 2's only request finishes (the runner swaps ad3 into the freed slot)
    for _ in range(10):
        out, _ = run_step(s)
        if any(x.seq_id == "c#0" for x in out.seqs):
            break
    assert any(x.seq_id == "c#0" and x.lora_id == 3 for x in out.seqs)
    assert len(running_loras(s)) <= 2
    drain(s)
    assert s.kv.all_free() and s.stats().lora_running == [] and s.stats().lora_waiting == []


def test_lora_request_refused_without_lora_enabled():
    s = lora_scheduler(lora=False)
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        s.add_request(lreq("a", 1))
    s.add_request(lreq("base", 0))  # the base model still serves
    drain(s)


@settings(max_examples=40, deadline=None)
@given(max_loras=st.integers(1, 3),
       loras=st.lists(st.integers(0, 5), min_size=1, max_size=14),
       max_tokens=st.lists(st.integers(1, 4), min_size=14, max_size=14),
       budget=st.integers(4, 40), num_blocks=st.integers(12, 40))
def test_property_never_more_than_max_loras_running_and_all_finish(max_loras, loras, max_tokens, budget, num_blocks):
    """Any mix of adapters, budgets and (preempting) block counts: every step runs at most max_loras distinct
    adapters, each scheduled seq carries its request's lora_id, and every request finishes."""
    s = lora_scheduler(max_loras=max_loras, budget=budget, num_blocks=num_blocks)
    want = {}
    for i, lid in enumerate(loras):
        s.add_request(lreq(f"r{i}", lid, [20 + i % 3, 21, 22, 23, 24], max_tokens=max_tokens[i]))
        want[f"r{i}#0"] = lid
    done = set()
    for _ in range(500):
        if not s.has_unfinished():
            break
        out, deltas = run_step(s)
        assert len({x.lora_id for x in out.seqs if x.lora_id}) <= max_loras
        assert len(running_loras(s)) <= max_loras
        assert all(x.lora_id == want[x.seq_id] for x in out.seqs)
        done |= {d.request_id for d in deltas if d.finish_reason}
    assert done == {f"r{i}" for i in range(len(loras))}
    assert s.kv.all_free()


def test_two_adapters_never_share_prefix_cache_blocks():
    s = lora_scheduler(max_loras=2)
    prompt = list(range(100, 117))  # 4 full blocks + 1
    s.add_request(lreq("a", 1, prompt, max_tokens=1))
    drain(s)
    for rid, lid, hit in (("other-adapter", 2, 0), ("base", 0, 0), ("same-adapter", 1, 16)):
        s.add_request(lreq(rid, lid, prompt, max_tokens=1))
        _, deltas = run_step(s)
        assert deltas[0].num_cached_tokens == hit, rid
        drain(s)
    # the base request cached its own blocks: a second base request hits them, an adapter's does not
    s.add_request(lreq("base2", 0, prompt, max_tokens=1))
    assert run_step(s)[1][0].num_cached_tokens == 16


def test_engine_args_enable_lora_takes_effect():
    cfg = engine_config("m", enable_lora=True, max_loras=4, max_lora_rank=8, max_cpu_loras=6,
                        lora_modules=["sql=/a/sql", '{"name": "chat", "path": "/a/chat", "base_model_name": "m"}'])
    assert cfg.lora == LoRAConfig(max_loras=4, max_lora_rank=8, max_cpu_loras=6,
                                  lora_modules=(("sql", "/a/sql"), ("chat", "/a/chat")))
    assert engine_config("m").lora is None
    assert engine_config("m", enable_lora=True).lora == LoRAConfig()


@pytest.mark.parametrize(("kw", "match"), [
    ({"max_loras": 2}, "invalid max_loras: LoRA options need enable_lora=True"),
    ({"enable_lora": True, "max_loras": 0}, r"invalid max_loras=0: must be an integer >= 1"),
    ({"enable_lora": True, "max_lora_rank": -8}, r"invalid max_lora_rank=-8"),
    ({"enable_lora": True, "max_loras": 4, "max_cpu_loras": 2}, r"invalid max_cpu_loras=2: must be an integer >= max_loras \(4\)"),
    ({"enable_lora": True, "lora_modules": ["a=/x", "a=/y"]}, "the name 'a' is given twice"),
])
def test_lora_config_errors_name_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        lora_config(kw.pop("enable_lora", False), **kw)


@pytest.mark.parametrize("spec", ["noequals", "=path", "name=", "{bad json", '{"name": "a"}', '{"name": "a", "path": "/p", "x": 1}',
                                  ["a"], 3])
def test_parse_lora_module_rejects_malformed(spec):
    with pytest.raises(ValueError, match="invalid lora_modules entry"):
        parse_lora_module(spec)


def test_parse_lora_module_forms():
    assert parse_lora_module("a=/p/q=r") == ("a", "/p/q=r")  # only the first '=' separates
    assert parse_lora_module({"name": "a", "path": "/p"}) == ("a", "/p")
    assert parse_lora_module(("a", "/p")) == ("a", "/p")
