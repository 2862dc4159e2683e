"""Tokenization (and chat-template rendering) off the event loop, and the bound on prompt text checked
before any of it runs.

A multi-megabyte prompt takes seconds to tokenize; on the event loop that stalls every stream, /health and
/metrics with it. One worker thread does it instead: the Rust tokenizer releases the GIL while it encodes,
and a single worker keeps concurrent requests from contending for the tokenizer's interior borrow
("Already borrowed") and from taking more than one core away from the engine.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any, TypeVar

from tokenmill.server.errors import APIError
from tokenmill.server.state import ServerState

T = TypeVar("T")


async def run_tokenizer(state: ServerState, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs) on the server's tokenizer thread; its exceptions (APIError included) propagate."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(state.tokenizer_executor, functools.partial(fn, *args, **kwargs))


def max_prompt_chars(state: ServerState) -> int:
    """--max-prompt-chars, else max_model_len * prompt_chars_per_token: text that long cannot fit anyway."""
    cfg = state.server_config
    if cfg.max_prompt_chars is not None:
        return cfg.max_prompt_chars
    return state.engine.model_info.max_model_len * cfg.prompt_chars_per_token


def check_prompt_chars(num_chars: int, state: ServerState, param: str) -> None:
    """400 naming `param` when the prompt text is longer than the server tokenizes."""
    limit = max_prompt_chars(state)
    if num_chars > limit:
        cfg = state.server_config
        why = ("--max-prompt-chars" if cfg.max_prompt_chars is not None else
               f"{state.engine.model_info.max_model_len} tokens of context x {cfg.prompt_chars_per_token} "
               "characters per token; text that long cannot fit the context")
        raise APIError(400, f"invalid {param}: {num_chars} characters of prompt text; at most {limit} are "
                       f"accepted ({why}). Shorten the prompt.", param=param, code="context_length_exceeded")


def text_chars(value: Any) -> int:
    """Characters of text in a prompt field: a string, or a list holding strings (token ids count 0)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(len(x) for x in value if isinstance(x, str))
    return 0
