"""Async test client helpers: send one (streaming) request and record what came back, event by event."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx


@dataclass
class Result:
    status: int
    headers: dict[str, str]
    events: list[dict] = field(default_factory=list)
    done: bool = False  # saw data: [DONE]
    error: dict | None = None  # an SSE error event, if any
    body: dict | None = None  # non-stream JSON body
    first_event_at: float | None = None

    @property
    def replica(self) -> str | None:
        return self.headers.get("x-tokenmill-replica")

    @property
    def text(self) -> str:
        out = []
        for e in self.events:
            for c in e.get("choices", []):
                out.append(c.get("text") or (c.get("delta") or {}).get("content") or "")
        return "".join(out)


async def post(client: httpx.AsyncClient, url: str, body: dict, headers: dict | None = None,
               on_first: Callable[[Result], None] | None = None) -> Result:
    """POST and read everything; streams are parsed as SSE. `on_first` sees the result at its first event."""
    if not body.get("stream"):
        r = await client.post(url, json=body, headers=headers)
        res = Result(r.status_code, dict(r.headers))
        try:
            res.body = r.json()
        except ValueError:
            pass
        return res
    async with client.stream("POST", url, json=body, headers=headers) as r:
        res = Result(r.status_code, dict(r.headers))
        if r.status_code != 200:
            await r.aread()
            res.body = r.json()
            return res
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                res.done = True
                continue
            ev = json.loads(data)
            if res.first_event_at is None:
                res.first_event_at = time.monotonic()
                if on_first is not None:
                    on_first(res)
            if "error" in ev:
                res.error = ev["error"]
            else:
                res.events.append(ev)
    return res


def completion(n_tokens: int = 8, stream: bool = True, **kw: object) -> dict:
    return {"prompt": "hello", "max_tokens": n_tokens, "stream": stream, "temperature": 0, **kw}
