"""TEST REPLICA of an OpenAI-compatible streaming server, for the bench client's own tests.

Not a model: it "generates" the prompt's own token ids cyclically, one SSE event per token, with a fixed
delay per token, and reports exact usage from a real tokenizer. It exists so the load generator can be
tested against known token counts and a server of a different make than `tokenmill serve`; the main bench
tests run against a live `tokenmill serve` on a tiny model.

A prompt containing "<<fail>>" gets HTTP 500, so tests can inject failures at known requests.

Run: python -m tests.bench.openai_replica --port P --tokenizer DIR [--token-delay S]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


def build_app(tokenizer_dir: str, token_delay_s: float, model_name: str) -> FastAPI:
    from pathlib import Path

    from tokenizers import Tokenizer

    # The `tokenizers` library directly: same ids as the HF wrapper, without importing transformers (slow).
    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    app = FastAPI()
    counter = itertools.count(1)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "root": model_name}]}

    @app.get("/health")
    async def health() -> dict:
        return {}

    async def handle(request: Request, chat: bool):
        body = await request.json()
        n = next(counter)
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        if "<<fail>>" in prompt:
            return JSONResponse({"error": {"message": "replica: injected failure", "type": "server_error",
                                           "param": None, "code": None}}, status_code=500)
        max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
        prompt_ids = tok.encode(prompt, add_special_tokens=False).ids or [0]
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(choice: dict, usage: dict | None = None) -> bytes:
            data = {"id": f"cmpl-{n}", "object": obj, "created": int(time.time()), "model": model_name,
                    "choices": [choice] if choice else []}
            if usage is not None:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n".encode()

        async def stream():
            for i in range(max_tokens):
                await asyncio.sleep(token_delay_s)
                text = tok.decode([prompt_ids[i % len(prompt_ids)]])
                finish = "length" if i == max_tokens - 1 else None
                if chat:
                    delta = {"content": text} if i else {"role": "assistant", "content": text}
                    yield event({"index": 0, "delta": delta, "finish_reason": finish})
                else:
                    yield event({"index": 0, "text": text, "finish_reason": finish})
            if include_usage:
                yield event({}, {"prompt_tokens": len(prompt_ids), "completion_tokens": max_tokens,
                                 "total_tokens": len(prompt_ids) + max_tokens})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--token-delay", type=float, default=0.002)
    parser.add_argument("--model-name", default="replica")
    args = parser.parse_args()
    app = build_app(args.tokenizer, args.token_delay, args.model_name)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
