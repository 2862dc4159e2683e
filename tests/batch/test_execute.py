"""execute_line on an in-process ServerState (no HTTP): the handlers' answers, errors in OpenAI's shape."""

from __future__ import annotations

import asyncio

from tests.batch.conftest import make_state
from tokenmill.batch.execute import HANDLERS, effective_priority, execute_line
from tokenmill.batch.validate import SUPPORTED_ENDPOINTS

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0}


def test_lines_answer_like_the_endpoints(tiny_llama_dir):
    async def main() -> None:
        state = make_state(tiny_llama_dir)
        try:
            status, body = await execute_line(state, "/v1/chat/completions", CHAT, priority=1)
            assert status == 200 and body["object"] == "chat.completion"
            assert body["usage"]["completion_tokens"] == 5
            again = await execute_line(state, "/v1/chat/completions", CHAT, priority=1)
            assert again[1]["choices"] == body["choices"]  # greedy: the same answer
            status, body = await execute_line(state, "/v1/completions", {"model": "tiny", "prompt": [5, 6, 7],
                                                                         "max_tokens": 3}, priority=1)
            assert status == 200 and body["object"] == "text_completion"
            status, body = await execute_line(state, "/v1/chat/completions", {**CHAT, "stream": True}, priority=1)
            assert status == 400 and body["error"]["param"] == "stream"
            status, body = await execute_line(state, "/v1/completions", {"model": "tiny", "prompt": "x",
                                                                         "max_tokenz": 3}, priority=1)
            assert status == 400 and body["error"]["param"] == "max_tokenz"
            status, body = await execute_line(state, "/v1/embeddings", {"model": "tiny", "input": "x"}, priority=1)
            assert status == 400 and body["error"]["code"] == "wrong_task"
            status, body = await execute_line(state, "/v1/images", {}, priority=1)
            assert status == 400 and body["error"]["param"] == "url"
            assert state.in_flight_seqs == 0
        finally:
            await state.engine.shutdown()
    asyncio.run(main())


def test_a_line_cannot_raise_its_priority_above_the_batch():
    assert effective_priority({}, 1) == 1
    assert effective_priority({"priority": -5}, 1) == 1
    assert effective_priority({"priority": 7}, 1) == 7
    assert effective_priority({"priority": True}, 1) == 1


def test_every_endpoint_validation_accepts_has_a_handler():
    assert set(HANDLERS) == set(SUPPORTED_ENDPOINTS)
