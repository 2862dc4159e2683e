"""A small real OpenAI-compatible TEST replica: deterministic tokens with a configurable delay.

Not a model server. It exists so gateway tests can start replicas in well under a second and make
one deliberately slow, failing or killable. It speaks the same HTTP surface the gateway relies on:
/v1/completions and /v1/chat/completions (stream or not), /v1/embeddings (hashed bag of words),
/v1/models, /health, and /metrics with tokenmill_num_requests_waiting / _running / kv_cache_usage_perc.
A constrained request (tools, response_format, structured_outputs) is answered by echo(): the body bytes it
received, as content, and a tool call when tools were sent, so a test can see what reached the replica.

    python tests/gateway/replica_server.py --port 8001 --token-delay 0.01 --max-running 4
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse


def build_app(args: argparse.Namespace) -> FastAPI:
    app = FastAPI()
    sem = asyncio.Semaphore(args.max_running)
    state = {"waiting": 0, "running": 0, "served": 0, "received": 0}
    adapters = [a for a in args.adapters.split(",") if a]  # LoRA adapter names, listed with parent = the model

    def token(i: int) -> str:
        return f" w{i}"

    @app.get("/health")
    async def health() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        cards = [{"id": args.model, "object": "model", "owned_by": "test", "parent": None}]
        cards += [{"id": a, "object": "model", "owned_by": "test", "parent": args.model} for a in adapters]
        return JSONResponse({"object": "list", "data": cards})

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> PlainTextResponse:
        adapters.append(str((await request.json())["lora_name"]))
        return PlainTextResponse("Success")

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        lab = f'{{model_name="{args.model}"}}'
        kv = min(1.0, state["running"] / max(1, args.max_running))
        return PlainTextResponse(
            f"# TYPE tokenmill_num_requests_waiting gauge\ntokenmill_num_requests_waiting{lab} {state['waiting']}\n"
            f"# TYPE tokenmill_num_requests_running gauge\ntokenmill_num_requests_running{lab} {state['running']}\n"
            f"# TYPE tokenmill_kv_cache_usage_perc gauge\ntokenmill_kv_cache_usage_perc{lab} {kv}\n"
            f"# TYPE test_replica_served counter\ntest_replica_served_total {state['served']}\n"
            f"# TYPE test_replica_received counter\ntest_replica_received_total {state['received']}\n")

    async def generate(raw: bytes, chat: bool, request: Request):
        state["received"] += 1
        body, problem = parse(raw, chat)
        if problem is not None:  # like a real server: a bad body is the client's error (4xx), never a 500
            return JSONResponse({"error": {"message": problem, "type": "invalid_request_error", "param": None,
                                           "code": None}}, status_code=400)
        if any(k in body for k in ("tools", "response_format", "structured_outputs")):
            return echo(raw, body, chat)
        if args.fail_prompt and args.fail_prompt in json.dumps(body.get("prompt", body.get("messages"))):
            # as tokenmill serve answers a request the engine failed alone: a 5xx scoped to the request
            return JSONResponse({"error": {"message": "the engine failed this request", "type": "internal_error",
                                           "param": None, "code": "request_failed"}}, status_code=500,
                                headers={"x-tokenmill-error-scope": "request"})
        if args.fail_status:
            headers = {"retry-after": "1"} if args.fail_status == 503 else None  # 503: not started, retry later
            return JSONResponse({"error": {"message": "test replica failing on purpose", "type": "server_error",
                                           "param": None, "code": None}}, status_code=args.fail_status,
                                headers=headers)
        if body.get("model") not in (None, args.model, *adapters):
            return JSONResponse({"error": {"message": f"model {body.get('model')} not found",
                                           "type": "invalid_request_error", "param": "model",
                                           "code": "model_not_found"}}, status_code=404)
        n_tok = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
        obj = "chat.completion" if chat else "text_completion"
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{args.port}-{state['served']}"
        state["waiting"] += 1
        await sem.acquire()
        state["waiting"] -= 1
        state["running"] += 1

        def done() -> None:
            state["running"] -= 1
            state["served"] += 1
            sem.release()

        if not body.get("stream"):
            try:
                await asyncio.sleep(args.ttft_delay + args.token_delay * n_tok)
                text = "".join(token(i) for i in range(n_tok))
                choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                          if chat else {"index": 0, "text": text, "finish_reason": "length"})
                return JSONResponse({"id": rid, "object": obj, "created": int(time.time()),
                                     "model": body.get("model") or args.model,
                                     "choices": [choice], "usage": {"prompt_tokens": 1, "completion_tokens": n_tok,
                                                                    "total_tokens": n_tok + 1}})
            finally:
                done()

        async def events():
            try:
                await asyncio.sleep(args.ttft_delay)
                kind = "chat.completion.chunk" if chat else "text_completion"
                for i in range(n_tok):
                    if i:
                        await asyncio.sleep(args.token_delay)
                    last = i == n_tok - 1
                    choice = ({"index": 0, "delta": {"content": token(i)} if i else {"role": "assistant",
                               "content": token(i)}, "finish_reason": "length" if last else None}
                              if chat else {"index": 0, "text": token(i), "finish_reason": "length" if last else None})
                    yield f"data: {json.dumps({'id': rid, 'object': kind, 'model': args.model, 'choices': [choice]})}\n\n"
                if (body.get("stream_options") or {}).get("include_usage"):
                    usage = {"prompt_tokens": 1, "completion_tokens": n_tok, "total_tokens": n_tok + 1}
                    yield f"data: {json.dumps({'id': rid, 'object': kind, 'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                done()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(await request.body(), False, request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await generate(await request.body(), True, request)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        body, _ = parse(await request.body(), False)
        if not isinstance(body.get("input"), str | list):
            return JSONResponse({"error": {"message": "input: expected a string or a list", "type":
                                           "invalid_request_error", "param": "input", "code": None}}, status_code=400)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [{"object": "embedding", "index": i, "embedding": embed(str(t))} for i, t in enumerate(inputs)]
        return JSONResponse({"object": "list", "data": data, "model": args.model,
                             "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}})

    return app


def parse(raw: bytes, chat: bool) -> tuple[dict, str | None]:
    """The body, or what is wrong with it (the fields this replica reads)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}, "body is not valid JSON"
    if not isinstance(body, dict):
        return {}, "body must be a JSON object"
    n = body.get("max_completion_tokens") or body.get("max_tokens") or 16
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 4096:
        return body, "max_tokens: expected an integer in 1..4096"
    if not isinstance(body.get("stream_options") or {}, dict):
        return body, "stream_options: expected an object"
    if chat and not isinstance(body.get("messages"), list):
        return body, "messages: expected a list"
    if "tools" in body and not (isinstance(body["tools"], list) and all(
            isinstance(t, dict) and isinstance(t.get("function"), dict) and "name" in t["function"]
            for t in body["tools"])):
        return body, "tools: expected a list of {function: {name}}"
    return body, None


def echo(raw: bytes, body: dict, chat: bool):
    """The received body as the content; with tools, one call to the first tool (arguments: how many
    tools were sent). Deterministic (id from the body's hash, created 0), so direct and relayed answers compare byte
    for byte. Streamed: the call's id/name first, its arguments in two fragments, then the content."""
    rid = f"echo-{hashlib.sha256(raw).hexdigest()[:16]}"
    text = raw.decode()
    tools = body.get("tools") or []
    call = None
    if tools:
        args_json = json.dumps({"num_tools": len(tools)})
        call = {"id": "call_0", "type": "function",
                "function": {"name": tools[0]["function"]["name"], "arguments": args_json}}
    reason = "tool_calls" if call else "stop"
    if not body.get("stream"):
        choice = ({"index": 0, "message": {"role": "assistant", "content": text,
                                           **({"tool_calls": [call]} if call else {})}, "finish_reason": reason}
                  if chat else {"index": 0, "text": text, "finish_reason": reason})
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion", "created": 0,
                             "model": body.get("model"), "choices": [choice]})
    deltas: list[dict] = []
    if call and chat:
        a = call["function"]["arguments"]
        deltas += [{"role": "assistant", "tool_calls": [{"index": 0, "id": call["id"], "type": "function",
                                                         "function": {"name": call["function"]["name"]}}]},
                   {"tool_calls": [{"index": 0, "function": {"arguments": a[:5]}}]},
                   {"tool_calls": [{"index": 0, "function": {"arguments": a[5:]}}]}]
    kind = "chat.completion.chunk" if chat else "text_completion"

    async def events():
        pieces = [{"index": 0, "delta": d, "finish_reason": None} for d in deltas]
        pieces.append({"index": 0, "delta": {"content": text}, "finish_reason": reason} if chat
                      else {"index": 0, "text": text, "finish_reason": reason})
        for c in pieces:
            yield f"data: {json.dumps({'id': rid, 'object': kind, 'model': body.get('model'), 'choices': [c]})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def embed(text: str, dim: int = 64) -> list[float]:
    """Hashed bag of lower-cased words, L2-normalised: texts sharing words are similar."""
    v = [0.0] * dim
    for w in text.lower().split():
        h = int.from_bytes(hashlib.md5(w.strip(".,!?:;()").encode()).digest()[:4], "big")
        v[h % dim] += 1.0
    n = math.sqrt(sum(x * x for x in v)) or 1.0
    return [x / n for x in v]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", default="test-model")
    ap.add_argument("--adapters", default="", help="comma-separated LoRA adapter names it also serves")
    ap.add_argument("--token-delay", type=float, default=0.0, help="seconds between streamed tokens")
    ap.add_argument("--ttft-delay", type=float, default=0.0, help="seconds before the first token")
    ap.add_argument("--max-running", type=int, default=64, help="requests generated at once; others wait")
    ap.add_argument("--fail-status", type=int, default=0, help="answer every generation with this status")
    ap.add_argument("--fail-prompt", default="", help="a prompt containing this text gets a request-scoped 500")
    args = ap.parse_args()
    uvicorn.run(build_app(args), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
