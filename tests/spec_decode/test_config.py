"""--speculative-config / LLM(speculative_config=...): vLLM's keys parsed into config.SpeculativeConfig."""

from __future__ import annotations

import json
import re

import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tokenmill.config import SpeculativeConfig
from tokenmill.engine.args import engine_config
from tokenmill.server.cli import serve_command
from tokenmill.spec_decode.config import (
    DEFAULT_PROMPT_LOOKUP,
    MAX_SPECULATIVE_TOKENS,
    SUPPORTED_KEYS,
    parse_speculative_config,
)

DEFAULT_BATCH = SpeculativeConfig().disable_by_batch_size


def test_off_by_default():
    assert parse_speculative_config(None) is None
    assert parse_speculative_config("null") is None
    assert engine_config(None).speculative is None


def test_ngram_as_vllm_spells_it():
    cfg = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
                                    "prompt_lookup_min": 2})
    assert cfg == SpeculativeConfig(method="ngram", num_speculative_tokens=4, prompt_lookup_max=4,
                                    prompt_lookup_min=2, model=None, disable_by_batch_size=DEFAULT_BATCH)
    # the same as JSON text, and vLLM's older "[ngram]" spelling as method or as model
    text = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}'
    assert parse_speculative_config(text) == cfg
    assert parse_speculative_config(text.replace('"ngram"', '"[ngram]"')) == cfg
    assert parse_speculative_config({"model": "[ngram]", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
                                     "prompt_lookup_min": 2}) == cfg


def test_prompt_lookup_defaults_follow_vllm():
    both = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 3})
    assert (both.prompt_lookup_min, both.prompt_lookup_max) == (DEFAULT_PROMPT_LOOKUP, DEFAULT_PROMPT_LOOKUP)
    only_max = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3})
    assert (only_max.prompt_lookup_min, only_max.prompt_lookup_max) == (3, 3)
    only_min = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2})
    assert (only_min.prompt_lookup_min, only_min.prompt_lookup_max) == (2, 2)


def test_a_model_without_method_is_a_draft_model():
    cfg = parse_speculative_config({"model": "/models/draft.gguf", "num_speculative_tokens": 5,
                                    "disable_by_batch_size": 8})
    assert (cfg.method, cfg.model, cfg.num_speculative_tokens, cfg.disable_by_batch_size) == (
        "draft_model", "/models/draft.gguf", 5, 8)
    assert parse_speculative_config({"method": "draft_model", "model": "d", "num_speculative_tokens": 1}).model == "d"


def test_disable_by_batch_size_absent_is_the_default_and_null_is_never():
    assert parse_speculative_config({"method": "ngram", "num_speculative_tokens": 2}).disable_by_batch_size == \
        DEFAULT_BATCH
    cfg = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": None})
    assert cfg.disable_by_batch_size is None


def test_gpu_only_keys_are_accepted_at_values_that_change_nothing():
    cfg = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 2, "enforce_eager": True,
                                    "draft_tensor_parallel_size": 1, "rejection_sample_method": "standard"})
    assert cfg.num_speculative_tokens == 2
    with pytest.raises(ValueError, match=r"speculative_config.draft_tensor_parallel_size=2: only 1 is supported"):
        parse_speculative_config({"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 2})


@pytest.mark.parametrize(("cfg", "message"), [
    ({"method": "ngram", "num_speculative_tokens": 4, "lookahead": 3},
     "speculative_config.lookahead=3: unknown key; allowed keys: " + ", ".join(SUPPORTED_KEYS)),
    ({"method": "ngram", "num_speculative_tokens": 4, "acceptance_method": "typical_acceptance_sampler"},
     "speculative_config.acceptance_method='typical_acceptance_sampler': this vLLM key is not supported here"),
    ({"model": "d", "num_speculative_tokens": 4, "quantization": "fp8"},
     "speculative_config.quantization='fp8': this vLLM key is not supported here"),
    ({"method": "eagle", "model": "e", "num_speculative_tokens": 4},
     "speculative_config.method='eagle': not supported here; supported methods: ngram, draft_model"),
    ({"method": "lookahead", "num_speculative_tokens": 4},
     "speculative_config.method='lookahead': unknown method; supported methods: ngram, draft_model"),
    ({"num_speculative_tokens": 4}, "speculative_config.method=None: give method"),
    ({"method": "ngram"}, "speculative_config.num_speculative_tokens=None: required"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens=0: must be between 1 and 16"),
    ({"method": "ngram", "num_speculative_tokens": 17}, "num_speculative_tokens=17: must be between 1 and 16"),
    ({"method": "ngram", "num_speculative_tokens": True}, "num_speculative_tokens=True: must be an integer"),
    ({"method": "ngram", "num_speculative_tokens": 4.0}, "num_speculative_tokens=4.0: must be an integer"),
    ({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "speculative_config.prompt_lookup_min=4: must be <= prompt_lookup_max (2)"),
    ({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 0}, "prompt_lookup_max=0: must be >= 1"),
    ({"method": "ngram", "num_speculative_tokens": 4, "model": "/m/draft"},
     "speculative_config.model='/m/draft': method 'ngram' looks tokens up in the sequence itself"),
    ({"method": "draft_model", "num_speculative_tokens": 4},
     "speculative_config.model=None: method 'draft_model' needs the draft model"),
    ({"model": "d", "num_speculative_tokens": 4, "prompt_lookup_max": 3},
     "prompt_lookup_max=3: applies to method 'ngram' only"),
    ({"method": "ngram", "num_speculative_tokens": 4, "disable_by_batch_size": 0},
     "disable_by_batch_size=0: must be >= 1"),
])
def test_bad_configs_name_the_key_and_what_is_allowed(cfg, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_speculative_config(cfg)
    with pytest.raises(ValueError, match=re.escape(message)):  # the same error through the JSON text
        parse_speculative_config(json.dumps(cfg))


def test_bad_json_and_non_objects():
    with pytest.raises(ValueError, match=r"invalid speculative_config: not valid JSON .*\{\"method\": \"ngram\""):
        parse_speculative_config("{method: ngram}")
    with pytest.raises(ValueError, match="invalid speculative_config of type list: must be a JSON object"):
        parse_speculative_config("[1, 2]")
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_speculative_config("[" * 100_000)  # nesting deeper than the JSON parser's stack


def test_a_hand_built_config_is_checked_too():
    cfg = SpeculativeConfig(method="draft_model", model="d", num_speculative_tokens=3)
    assert parse_speculative_config(cfg) == SpeculativeConfig(method="draft_model", model="d",
                                                              num_speculative_tokens=3,
                                                              disable_by_batch_size=cfg.disable_by_batch_size)
    with pytest.raises(ValueError, match="num_speculative_tokens=99"):
        parse_speculative_config(SpeculativeConfig(num_speculative_tokens=99))


def test_llm_engine_argument_takes_a_dict_or_json():
    cfg = engine_config(None, speculative_config={"method": "ngram", "num_speculative_tokens": 2}).speculative
    assert cfg is not None and cfg.method == "ngram" and cfg.num_speculative_tokens == 2
    text = '{"model": "/m/draft", "num_speculative_tokens": 3}'
    assert engine_config(None, speculative_config=text).speculative.model == "/m/draft"
    with pytest.raises(ValueError, match="speculative_config.num_speculative_tokens"):
        engine_config(None, speculative_config={"method": "ngram"})


def _serve(*args: str) -> tuple[int, str]:
    app = typer.Typer()
    app.command()(serve_command)
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, " ".join(re.sub(r"[│╭╮╰╯─]", " ", r.output).split())


def test_serve_flag_rejects_a_bad_config_in_one_line():
    code, out = _serve("--speculative-config", '{"method": "ngram", "num_speculative_tokens": 40}')
    assert code == 2 and "Traceback" not in out
    assert ("Invalid value for --speculative-config: invalid speculative_config.num_speculative_tokens=40: "
            "must be between 1 and 16") in out


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=False, width=16),
                    st.sampled_from(["ngram", "[ngram]", "draft_model", "eagle", "", "/m/d", "standard"]))
_KEYS = st.sampled_from([*SUPPORTED_KEYS, "enforce_eager", "draft_tensor_parallel_size", "quantization", "x"])


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_KEYS, _VALUES, max_size=7))
def test_any_dict_gives_a_valid_config_or_a_value_error(cfg):
    """Whatever a user writes: a config whose values are in range, or ValueError naming a key."""
    try:
        out = parse_speculative_config(cfg)
    except ValueError as e:
        assert str(e).startswith("invalid speculative_config.")
        return
    assert 1 <= out.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS
    assert out.disable_by_batch_size is None or out.disable_by_batch_size >= 1
    if out.method == "ngram":
        assert 1 <= out.prompt_lookup_min <= out.prompt_lookup_max and out.model is None
    else:
        assert out.method == "draft_model" and isinstance(out.model, str) and out.model
    assert parse_speculative_config(out) == out  # a parsed config parses to itself
