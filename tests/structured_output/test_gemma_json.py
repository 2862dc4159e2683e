"""The real default model (Gemma 3 270M GGUF): its LM head (262,144 logits) is wider than its tokenizer, and a
chat reply ends with <end_of_turn>; a JSON-schema reply must parse, validate and stop on its own."""

import json

import jsonschema
import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.sampling_params import StructuredOutputsParams as S

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40}, "country": {"type": "string", "maxLength": 40},
                   "population_millions": {"type": "integer", "minimum": 0, "maximum": 10000}},
    "required": ["city", "country", "population_millions"],
}


@pytest.mark.slow
def test_default_gemma_json_schema_output_validates():
    llm = LLM(max_model_len=1024, kv_cache_memory=0.25, max_num_seqs=4)
    width = llm.engine.scheduler.structured.logits_width
    assert width == 262_144 and width >= len(llm.get_tokenizer())
    messages = [{"role": "user", "content": "Give the capital of France as JSON with city, country and "
                                            "population_millions."}]
    params = [SamplingParams(temperature=0.0, max_tokens=200, structured_outputs=S(json=SCHEMA)),
              SamplingParams(temperature=0.8, seed=3, max_tokens=200, structured_outputs=S(json=SCHEMA))]
    for params_i in params:
        (out,) = llm.chat(messages, params_i)
        o = out.outputs[0]
        assert o.finish_reason == "stop", (o.finish_reason, o.text)
        jsonschema.validate(json.loads(o.text), SCHEMA)
