"""Prefix-cache keys: SHA-256 chain hashes with per-request cache_salt and a per-deployment salt.

Same prompt and salt -> shared blocks; a different (or missing) salt -> nothing shared. Checked on the
hash itself, through the torch-free scheduler, the offline LLM on the tiny model and the HTTP API.
"""

from __future__ import annotations

import httpx
import pytest

from tokenmill.config import SchedulerConfig
from tokenmill.engine.args import engine_config
from tokenmill.engine.block_pool import cache_extra_keys, hash_block
from tokenmill.engine.outputs import KVCacheGroupSpec
from tokenmill.engine.scheduler import Scheduler
from tokenmill.sampling_params import SamplingParams

from .helpers import drain, make_scheduler, req, run_step


def test_hash_is_sha256_chain_over_parent_extra_and_tokens():
    h = hash_block(None, [1, 2, 3, 4])
    assert isinstance(h, bytes) and len(h) == 32
    assert h == hash_block(None, (1, 2, 3, 4))  # deterministic, not tied to the process (no PYTHONHASHSEED)
    assert h != hash_block(None, [1, 2, 3, 5])
    assert h != hash_block(h, [1, 2, 3, 4])  # position enters through the parent
    assert h != hash_block(None, [1, 2, 3, 4], cache_extra_keys(cache_salt="a"))
    # the extra keys are length-prefixed: moving bytes between them and the tokens changes the hash
    assert hash_block(None, [1], b"\x01" + bytes(7)) != hash_block(None, [1, 1])


def test_extra_keys_separate_salts_and_their_kinds():
    assert cache_extra_keys() == b""
    keys = {cache_extra_keys(*args) for args in [("a", None), (None, "a"), ("a", "a"), (None, None, "a"),
                                                 ("a", "b"), ("b", "a")]}
    assert len(keys) == 6  # a deployment salt never equals a request salt of the same text


def test_cache_salt_must_be_a_non_empty_string():
    assert SamplingParams(cache_salt="tenant-1").cache_salt == "tenant-1"
    with pytest.raises(ValueError, match="invalid cache_salt='': must be a non-empty string"):
        SamplingParams(cache_salt="")


def _hit_of(s, rid: str, prompt: list[int], **kw) -> int:
    """Admit a request alone and return its prefix-cache hit in tokens."""
    s.add_request(req(rid, prompt, max_tokens=1, **kw))
    out, _ = run_step(s)
    [x] = [x for x in out.seqs if x.seq_id == f"{rid}#0"]
    drain(s)
    return x.start_pos


def test_scheduler_shares_blocks_only_between_equal_salts():
    s = make_scheduler(block_size=4)
    prompt = list(range(100, 113))  # 3 full blocks + 1 token
    assert _hit_of(s, "a1", prompt, cache_salt="a") == 0
    assert _hit_of(s, "a2", prompt, cache_salt="a") == 12
    assert _hit_of(s, "b1", prompt, cache_salt="b") == 0  # another tenant: not a single block
    assert _hit_of(s, "none1", prompt) == 0  # unsalted requests do not see salted blocks
    assert _hit_of(s, "none2", prompt) == 12
    assert _hit_of(s, "b2", prompt, cache_salt="b") == 12
    assert s.kv.all_free()


def test_n_samples_of_a_salted_request_share_its_prompt_blocks():
    s = make_scheduler(block_size=4)
    s.add_request(req("r", list(range(9)), max_tokens=2, n=2, cache_salt="t"))
    drain(s)
    assert s.stats().prefix_cache_hits == 8  # sample 1 reused sample 0's two full blocks


def _scheduler_with_salt(salt: str | None) -> Scheduler:
    cache = engine_config("m", block_size=4, prefix_cache_salt=salt).cache  # as --prefix-cache-salt sets it
    return Scheduler(SchedulerConfig(), cache, [KVCacheGroupSpec(layer_ids=[0])], [64], 256, vocab_size=1000)


def test_deployment_salt_changes_every_hash_but_still_shares_within_the_deployment():
    plain, salted = _scheduler_with_salt(None), _scheduler_with_salt("secret")
    assert salted.kv.deployment_salt == "secret" and plain.kv.deployment_salt is None
    prompt = list(range(9))
    for s in (plain, salted):
        assert _hit_of(s, "x", prompt) == 0
        assert _hit_of(s, "y", prompt) == 8
    plain_hashes, salted_hashes = set(plain.kv.pools[0]._cached), set(salted.kv.pools[0]._cached)
    assert len(plain_hashes) == len(salted_hashes) == 2 and not plain_hashes & salted_hashes
    again = _scheduler_with_salt("secret")  # same salt, e.g. after a restart: the same keys
    _hit_of(again, "x", prompt)
    assert set(again.kv.pools[0]._cached) == salted_hashes


def test_offline_llm_reports_cached_tokens_per_salt(llama_llm):
    prompt = {"prompt_token_ids": list(range(417, 399, -1))}  # 4 full blocks of 4 + 2; no other test uses it

    def cached(salt: str | None) -> int:
        params = SamplingParams(temperature=0, max_tokens=1, cache_salt=salt)
        return llama_llm.generate([prompt], params)[0].num_cached_tokens

    assert cached("alice") == 0
    assert cached("alice") == 16
    assert cached("bob") == 0
    assert cached(None) == 0
    assert cached("bob") == 16


def test_http_cache_salt_isolates_cached_tokens(tiny_server):
    prompt = list(range(200, 240))  # 40 tokens: 2 full blocks of 16

    def cached(salt: str | None) -> int:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0}
        if salt is not None:
            body["cache_salt"] = salt
        r = httpx.post(tiny_server.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return (r.json()["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)

    assert cached("alice") == 0
    assert cached("alice") == 32
    assert cached("mallory") == 0
    assert cached(None) == 0
    assert cached(None) == 32

    r = httpx.post(tiny_server.url + "/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": prompt, "max_tokens": 1, "cache_salt": ""})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "cache_salt" and "non-empty string" in err["message"]
    r = httpx.post(tiny_server.url + "/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": prompt, "max_tokens": 1, "cache_salt": 5})
    assert r.status_code == 400 and "cache_salt" in r.text
