"""One streaming request to an OpenAI-compatible endpoint, timed the way `vllm bench serve` times it.

TTFT is the time to the first SSE event carrying `choices`; each later such event adds one ITL sample;
the end-to-end latency ends at the last token-carrying event (the trailing usage chunk carries no token).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from tokenmill.bench.datasets import SampleRequest


@dataclass(slots=True)
class RequestResult:
    """Outcome of one request. Times are seconds from `time.perf_counter()`; `start_time` is absolute."""

    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0  # from the server's usage report; 0 when it sent none
    num_chunks: int = 0  # token-carrying SSE events
    generated_text: str = ""
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    start_time: float = 0.0
    queue_time: float = 0.0  # time waiting for a --max-concurrency slot before sending (vLLM's queue_times)
    error: str = ""


class SSEDecoder:
    """Splits a byte stream into SSE `data:` payloads, tolerating events split across reads."""

    def __init__(self) -> None:
        self._buffer = ""

    def feed(self, text: str) -> list[str]:
        self._buffer += text.replace("\r\n", "\n")
        payloads = []
        while "\n\n" in self._buffer:
            event, self._buffer = self._buffer.split("\n\n", 1)
            data_lines = [line[5:].lstrip() for line in event.split("\n") if line.startswith("data:")]
            # Lines starting with ':' are SSE comments (keep-alive pings): not data.
            if data_lines:
                payloads.append("\n".join(data_lines))
        return payloads


def build_payload(endpoint: str, model: str, request: SampleRequest, ignore_eos: bool,
                  extra_body: dict | None = None) -> dict:
    payload: dict = {"model": model, "stream": True, "stream_options": {"include_usage": True}}
    if endpoint.rstrip("/").endswith("chat/completions"):
        payload["messages"] = [{"role": "user", "content": request.prompt}]
        payload["max_completion_tokens"] = request.expected_output_len
    elif endpoint.rstrip("/").endswith("completions"):
        payload["prompt"] = request.prompt
        payload["max_tokens"] = request.expected_output_len
    else:
        raise ValueError(f"--endpoint must end with /completions or /chat/completions, got {endpoint!r}")
    if ignore_eos:
        payload["ignore_eos"] = True
    if extra_body:
        payload.update(extra_body)
    return payload


def _chunk_text(choice: dict) -> str:
    if "delta" in choice:
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


async def send_request(client: httpx.AsyncClient, url: str, payload: dict, prompt_len: int,
                       headers: dict[str, str] | None = None) -> RequestResult:
    """Stream one request; never raises (a failure is a result with `success=False` and an error).

    A kept-alive connection that the server closed before answering (llama-server's HTTP library closes each
    connection after 5 requests; the next request on it gets no response at all) is retried once on a fresh
    connection, timed from the first attempt, as HTTP clients do for a request the server never read."""
    result = RequestResult(prompt_len=prompt_len)
    result.start_time = time.perf_counter()
    for attempt in range(2):
        progress: list[bool] = []  # non-empty once a response started
        try:
            await _stream(client, url, payload, headers, result, progress)
            return result
        except httpx.RemoteProtocolError as exc:
            if progress or attempt:
                result.error = f"{type(exc).__name__}: {exc}"
                return result
        except (httpx.HTTPError, json.JSONDecodeError, ValueError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"
            return result
    return result


async def _stream(client: httpx.AsyncClient, url: str, payload: dict, headers: dict[str, str] | None,
                  result: RequestResult, progress: list[bool]) -> None:
    start = last = result.start_time
    got_token = False
    text_parts: list[str] = []
    async with client.stream("POST", url, json=payload, headers=headers) as response:
        progress.append(True)
        if response.status_code != 200:
            body = (await response.aread()).decode("utf-8", "replace")
            result.error = f"HTTP {response.status_code}: {body[:300]}"
            return
        decoder = SSEDecoder()
        async for text in response.aiter_text():
            for data in decoder.feed(text):
                if data == "[DONE]":
                    continue
                event = json.loads(data)
                if "error" in event:
                    result.error = f"stream error: {json.dumps(event['error'])[:300]}"
                    return
                now = time.perf_counter()
                if choices := event.get("choices"):
                    if not got_token:
                        got_token = True
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    result.num_chunks += 1
                    text_parts.append(_chunk_text(choices[0]))
                if usage := event.get("usage"):
                    result.output_tokens = int(usage.get("completion_tokens") or 0)
                    if usage.get("prompt_tokens") is not None:
                        result.prompt_len = int(usage["prompt_tokens"])
    result.generated_text = "".join(text_parts)
    result.latency = last - start
    result.success = got_token
    if not got_token:
        result.error = "the stream carried no token (no event with 'choices')"


async def first_model(client: httpx.AsyncClient, base_url: str, headers: dict[str, str] | None = None) -> str:
    """The first model id from `GET /v1/models`, as vLLM does when --model is omitted."""
    response = await client.get(f"{base_url}/v1/models", headers=headers)
    response.raise_for_status()
    data = response.json().get("data") or []
    if not data:
        raise ValueError(f"--model: {base_url}/v1/models lists no model; pass --model")
    return str(data[0]["id"])
