"""Offline LLM.chat(messages, tools=...): tools reach the prompt as the server renders them."""

from __future__ import annotations

import json

import pytest

from tokenmill import SamplingParams
from tokenmill.model.gguf_tokenizer import GEMMA_CHAT_TEMPLATE
from tokenmill.tools.prompt import gemma_tools_template, with_tools

TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"utc": {"type": "boolean"}}}}}
CONVO = [{"role": "user", "content": "Time?"},
         {"role": "assistant", "content": None, "tool_calls": [
             {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": '{"utc": true}'}}]},
         {"role": "tool", "tool_call_id": "c1", "content": "12:00"}]


@pytest.fixture(scope="module")
def llama_llm(tiny_llama_dir):
    """The tiny Llama at its full 512 positions: tool definitions and instructions take room."""
    from tokenmill import LLM

    return LLM(str(tiny_llama_dir), dtype="float32", num_gpu_blocks_override=64, max_model_len=512, seed=0)


def test_chat_with_tools_on_a_template_without_tool_support(llama_llm):
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    out = llama_llm.chat(CONVO, params, tools=[TOOL])[0]
    tok = llama_llm.get_tokenizer()
    prompt = tok.decode(out.prompt_token_ids)
    assert json.dumps(TOOL["function"]) in prompt  # the definition, in a system turn
    assert "[get_time(utc=True)]" in prompt and "Tool result: 12:00" in prompt
    # without tools the conversation renders as before
    plain = llama_llm.chat([{"role": "user", "content": "Time?"}], params)[0]
    assert "get_time" not in tok.decode(plain.prompt_token_ids)


def test_chat_with_tools_swaps_a_gemma_template(llama_llm):
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    out = llama_llm.chat(CONVO, params, tools=[TOOL], chat_template=GEMMA_CHAT_TEMPLATE)[0]
    tok = llama_llm.get_tokenizer()
    convo, tools, template = with_tools(CONVO, [TOOL], GEMMA_CHAT_TEMPLATE)
    assert template == gemma_tools_template()
    expected = tok.apply_chat_template(convo, tools=tools, chat_template=template, add_generation_prompt=True,
                                       tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert out.prompt_token_ids == list(expected)
    assert "```tool_output\n12:00\n```" in tok.decode(out.prompt_token_ids)
