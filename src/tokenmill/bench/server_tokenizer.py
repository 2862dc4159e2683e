"""The benchmark's tokenizer when none is given: the served model's own, found through the server.

`tokenmill bench serve` with no flags asks GET /v1/models for the model. When the model's `root` (a folder,
a .gguf file, or the default model's served name) exists on this machine, its tokenizer is loaded the way
`tokenmill serve` loads it (the GGUF conversion is cached, so this costs a few seconds). Otherwise (a
remote server) `ServerTokenizer` tokenizes through the server's POST /tokenize and /detokenize, vLLM's
extra endpoints, so random prompts still have exact lengths as the server counts them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

# A single token whose text looks like markup ("<start_of_turn>", "<unused7>", "[multimodal]") is a control
# token: the server does not say which ids are special, and such text would tokenize back to that token.
_TAG = re.compile(r"^\s*(<[^<>\s]+>|\[[^\[\]\s]+\])\s*$")


@dataclass(frozen=True, slots=True)
class ServedModel:
    """What GET /v1/models says about the model a benchmark targets."""

    id: str
    root: str | None
    max_model_len: int | None


def served_model(base_url: str, model: str | None, headers: dict[str, str] | None, timeout_s: float = 30.0,
                 flag: str = "--base-url") -> ServedModel:
    """The entry of GET /v1/models for `model` (default: the first one, as vLLM's benchmark picks it).
    `flag` is the option that gave the URL, named in the errors."""
    url = base_url.rstrip("/") + "/v1/models"
    try:
        response = httpx.get(url, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        where = "--base-url / --host / --port" if flag == "--base-url" else flag
        raise ValueError(f"{flag}: cannot reach {url} ({type(exc).__name__}: {exc}); start the server "
                         f"(tokenmill serve) or pass its address with {where}") from None
    if response.status_code != 200:
        raise ValueError(f"{flag}: GET {url} answered HTTP {response.status_code}: {response.text[:200]}")
    data = response.json().get("data") or []
    if not data:
        raise ValueError(f"--model: {url} lists no model; pass --model")
    entry = next((d for d in data if d.get("id") == model), None) if model else data[0]
    if entry is None:  # a name the server does not list (a gateway alias, say): send it as given
        return ServedModel(id=str(model), root=None, max_model_len=None)
    max_len = entry.get("max_model_len")
    return ServedModel(id=str(entry["id"]), root=entry.get("root"),
                       max_model_len=int(max_len) if isinstance(max_len, int) else None)


def local_model_path(name: str | None) -> str | None:
    """The local file or folder `name` resolves to as `tokenmill serve` resolves it; None if it does not."""
    if not name:
        return None
    from tokenmill.model.discovery import check_model

    try:
        return check_model(name)
    except (ValueError, OSError):
        return None


class ServerTokenizer:
    """The served model's tokenizer through /tokenize and /detokenize, with the few methods the random
    dataset uses (encode, decode, len, num_special_tokens_to_add, clean_token_pool).

    Each call is one HTTP request, so the random dataset draws its building-block tokens from a pool that
    `clean_token_pool` checks in batches (many tokens per request) instead of one token at a time.
    """

    def __init__(self, base_url: str, model: str, headers: dict[str, str] | None = None,
                 timeout_s: float = 60.0) -> None:
        self._base = base_url.rstrip("/")
        self._model = model
        self._client = httpx.Client(headers=headers, timeout=timeout_s)
        self.all_special_ids: list[int] = []  # unknown to the client; markup-like tokens stay out of the pool
        self._num_special = len(self._tokenize("", add_special_tokens=True))
        self._vocab_size = self._find_vocab_size()

    def close(self) -> None:
        self._client.close()

    def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        try:
            return self._client.post(self._base + path, json={"model": self._model, **body})
        except httpx.HTTPError as exc:
            raise ValueError(f"--tokenizer: {self._base}{path} failed ({type(exc).__name__}: {exc})") from None

    def _tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        response = self._post("/tokenize", {"prompt": text, "add_special_tokens": add_special_tokens})
        if response.status_code != 200:
            raise ValueError(f"--tokenizer: the server's /tokenize answered HTTP {response.status_code} "
                             f"({response.text[:200]}); pass --tokenizer (a tokenizer folder or a .gguf file)")
        return [int(t) for t in response.json()["tokens"]]

    def _detokenize(self, ids: list[int]) -> str | None:
        """The text of `ids`; None when the server refuses them (an id outside the vocabulary)."""
        response = self._post("/detokenize", {"tokens": ids})
        if response.status_code == 400:
            return None
        if response.status_code != 200:
            raise ValueError(f"--tokenizer: the server's /detokenize answered HTTP {response.status_code} "
                             f"({response.text[:200]})")
        return str(response.json()["prompt"])

    def _find_vocab_size(self) -> int:
        # /detokenize refuses ids outside the vocabulary: double, then bisect on the first refused id.
        high = 256
        while self._detokenize([high - 1]) is not None:
            if high >= 1 << 24:
                raise ValueError("--tokenizer: the server's /detokenize accepts every id; pass --tokenizer")
            high *= 2
        low = high // 2 if high > 256 else 0  # id low - 1 is valid (checked in the loop), id high - 1 is not
        while high - low > 1:
            mid = (low + high) // 2
            if self._detokenize([mid - 1]) is None:
                high = mid
            else:
                low = mid
        return low

    def __len__(self) -> int:
        return self._vocab_size

    def num_special_tokens_to_add(self) -> int:
        return self._num_special

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenize(text, add_special_tokens)

    def decode(self, ids: list[int]) -> str:
        text = self._detokenize([int(t) for t in ids])
        if text is None:
            raise ValueError(f"--tokenizer: the server refused token ids {list(ids)[:8]}")
        return text

    def clean_token_pool(self, rng: np.random.Generator, size: int = 2048, batch: int = 64) -> list[int]:
        """Ids whose text is plain (no control token, no byte fragment) and re-encodes to exactly that id.

        A batch of ids is decoded with a newline token between them and the texts re-encoded the same way,
        two requests for `batch` ids; a batch whose parts do not line up one to one (a token holding a
        newline, a merge across one) is dropped and the batch size halved: the pool needs some clean ids,
        not a verdict on each.
        """
        newline = self.encode("\n", add_special_tokens=False)
        if len(newline) != 1 or self.decode(newline) != "\n":
            batch = 1  # no one-token separator: check one id per request pair
        pool: list[int] = []
        for _ in range(max(64, 8 * size // batch)):
            if len(pool) >= size:
                break
            ids = [int(t) for t in rng.integers(0, self._vocab_size, size=batch)]
            if batch == 1:
                texts = [self.decode(ids)]
                encoded = [self.encode(texts[0], add_special_tokens=False)]
            else:
                texts = self.decode([t for i in ids for t in (i, newline[0])][:-1]).split("\n")
                joined = self.encode("\n".join(texts), add_special_tokens=False) if len(texts) == batch else []
                encoded = _split(joined, newline[0])
                if len(texts) != batch or len(encoded) != batch:
                    batch = max(1, batch // 2)
                    continue
            pool += [i for i, text, enc in zip(ids, texts, encoded)
                     if enc == [i] and text.strip() and "\ufffd" not in text and not _TAG.match(text)]
        if len(pool) < 16:
            raise ValueError("--tokenizer: too few plain-text tokens found through the server's /tokenize to "
                             "build random prompts; pass --tokenizer (a tokenizer folder or a .gguf file)")
        return pool


def _split(ids: list[int], sep: int) -> list[list[int]]:
    parts: list[list[int]] = [[]]
    for t in ids:
        if t == sep:
            parts.append([])
        else:
            parts[-1].append(t)
    return parts
