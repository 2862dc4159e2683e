"""Workloads: random prompts encode to exactly their target length; custom and sharegpt files parse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenmill.bench.datasets import build_workload, load_tokenizer


@pytest.fixture(scope="module")
def tok(bench_tokenizer_dir: Path):
    return load_tokenizer(str(bench_tokenizer_dir))


def test_random_lengths_are_exact_and_within_range(tok) -> None:
    reqs = build_workload("random", tokenizer=tok, num_prompts=20, dataset_path=None, input_len=40,
                          output_len=10, range_ratio=0.5, seed=3)
    assert len(reqs) == 20
    for r in reqs:
        assert 20 <= r.prompt_len <= 60
        assert len(tok.encode(r.prompt, add_special_tokens=False)) == r.prompt_len
        assert 5 <= r.expected_output_len <= 15
    # ratio 0.5 over 20 draws: lengths vary
    assert len({r.prompt_len for r in reqs}) > 1


def test_random_fixed_length_and_seeded(tok) -> None:
    kw = dict(tokenizer=tok, num_prompts=5, dataset_path=None, input_len=32, output_len=8, range_ratio=0.0)
    a = build_workload("random", seed=1, **kw)
    b = build_workload("random", seed=1, **kw)
    c = build_workload("random", seed=2, **kw)
    assert [r.prompt for r in a] == [r.prompt for r in b]
    assert [r.prompt for r in a] != [r.prompt for r in c]
    assert all(r.prompt_len == 32 and r.expected_output_len == 8 for r in a)


def test_custom_jsonl(tok, tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "the quick brown fox"}\n\n{"prompt": "serving models", "output_len": 3}\n')
    reqs = build_workload("custom", tokenizer=tok, num_prompts=4, dataset_path=str(path), input_len=1,
                          output_len=7, range_ratio=0.0, seed=0)
    assert len(reqs) == 4  # cycles the two prompts
    assert sorted({r.expected_output_len for r in reqs}) == [3, 7]
    for r in reqs:
        assert r.prompt_len == len(tok.encode(r.prompt, add_special_tokens=False))


def test_sharegpt(tok, tmp_path: Path) -> None:
    rows = [{"conversations": [{"from": "human", "value": "what is paged attention"},
                               {"from": "gpt", "value": "a way to store the kv cache in blocks"}]},
            {"conversations": [{"from": "human", "value": "only one turn"}]}]
    path = tmp_path / "s.json"
    path.write_text(json.dumps(rows))
    reqs = build_workload("sharegpt", tokenizer=tok, num_prompts=2, dataset_path=str(path), input_len=1,
                          output_len=1, range_ratio=0.0, seed=0)
    answer_len = len(tok.encode("a way to store the kv cache in blocks", add_special_tokens=False))
    assert all(r.prompt == "what is paged attention" and r.expected_output_len == answer_len for r in reqs)


@pytest.mark.parametrize("kwargs, field", [
    (dict(name="random", tokenizer=None), "--tokenizer"),
    (dict(name="custom", dataset_path=None), "--dataset-path"),
    (dict(name="bogus"), "--dataset-name"),
    (dict(name="random", range_ratio=1.5), "--random-range-ratio"),
    (dict(name="random", num_prompts=0), "--num-prompts"),
])
def test_errors_name_the_flag(tok, kwargs: dict, field: str) -> None:
    args = dict(tokenizer=tok, num_prompts=2, dataset_path=None, input_len=8, output_len=4, range_ratio=0.0,
                seed=0)
    args.update(kwargs)
    name = args.pop("name")
    with pytest.raises(ValueError, match=field):
        build_workload(name, **args)
