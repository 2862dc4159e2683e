"""Requests and sequences: the engine core's bookkeeping of tokens, status and progress.

A request (what a client asked for) fans out into `params.n` sequences (one per sample). The scheduler
works on sequences; a request is done when all its sequences are.
"""

from __future__ import annotations

import enum
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from tokenmill.engine.outputs import SeqSetup
from tokenmill.sampling_params import SamplingParams


@dataclass(slots=True)
class EngineCoreRequest:
    """Client -> core. Plain fields only, so it round-trips through msgpack via to_wire()/from_wire()."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    arrival_time: float = field(default_factory=time.time)
    eos_token_ids: list[int] = field(default_factory=list)
    lora_request: dict[str, Any] | None = None  # LoRARequest.to_wire(); None: the base model

    def to_wire(self) -> dict[str, Any]:
        d = asdict(self)
        # msgpack map keys must be str/int; logit_bias keys are ints already, which msgpack allows
        # only with strict_map_key=False, so send them as pairs.
        bias = d["params"].get("logit_bias")
        d["params"]["logit_bias"] = [[k, v] for k, v in bias.items()] if bias else None
        return d

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> EngineCoreRequest:
        p = dict(d["params"])
        if p.get("logit_bias") is not None:
            p["logit_bias"] = {int(k): float(v) for k, v in p["logit_bias"]}
        return cls(
            request_id=d["request_id"],
            prompt_token_ids=list(d["prompt_token_ids"]),
            params=SamplingParams(**p),
            priority=int(d.get("priority", 0)),
            arrival_time=float(d.get("arrival_time", time.time())),
            eos_token_ids=list(d.get("eos_token_ids", [])),
            lora_request=d.get("lora_request"),
        )


def check_prompt(ids: list[int], max_model_len: int, vocab_size: int | None, max_whole: int | None) -> None:
    """ValueError naming what is wrong with a prompt the engine cannot take. max_whole: the most tokens one step
    computes when prompts cannot be chunked (None: chunked prefill is on)."""
    n = len(ids)
    if n == 0:
        raise ValueError("invalid prompt: it has no tokens; at least one is required")
    if n > max_model_len:
        raise ValueError(f"invalid prompt: it has {n} tokens, more than max_model_len={max_model_len}")
    if max_whole is not None and n > max_whole:
        raise ValueError(f"invalid prompt: it has {n} tokens, more than max_num_batched_tokens={max_whole} while "
                         "chunked prefill is disabled (enable chunked prefill or raise max_num_batched_tokens)")
    if vocab_size is not None:
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"invalid prompt_token_ids: {bad[:5]} outside [0, {vocab_size})")


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_GRAMMAR = "waiting_for_grammar"  # structured output: parked until its grammar compiles
    RUNNING = "running"
    FINISHED = "finished"


def seq_id_of(request_id: str, index: int) -> str:
    return f"{request_id}#{index}"


class Sequence:
    """One sample of a request.

    Invariants: 0 <= num_computed_tokens <= num_tokens; tokens [0, num_computed_tokens) have K/V in the
    sequence's blocks; a WAITING sequence holds no blocks; after preemption num_computed_tokens is 0 and
    the tokens generated so far stay in output_token_ids (they are recomputed as if prompt).
    """

    __slots__ = (
        "arrival_time",
        "block_hashes",
        "eos_token_ids",
        "error",
        "finish_reason",
        "index",
        "lora",
        "lora_id",
        "max_model_len",
        "needs_setup",
        "num_cached_tokens",
        "num_computed_tokens",
        "order",
        "output_token_ids",
        "params",
        "priority",
        "prompt_done_once",
        "prompt_token_ids",
        "request_id",
        "seed",
        "seq_id",
        "spec_token_ids",
        "status",
        "stop_reason",
    )

    def __init__(self, req: EngineCoreRequest, index: int, order: int, max_model_len: int) -> None:
        self.seq_id = seq_id_of(req.request_id, index)
        self.request_id = req.request_id
        self.index = index
        self.prompt_token_ids = list(req.prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = req.params
        self.priority = req.priority
        self.arrival_time = req.arrival_time
        self.eos_token_ids = list(req.eos_token_ids)
        # Each sample gets its own stream: seed + index keeps n>1 samples distinct but reproducible.
        self.seed = None if req.params.seed is None else req.params.seed + index
        self.status = SeqStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prefix-cache hit of the first admission (reported to clients)
        self.needs_setup = True  # send SeqSetup the next time it is scheduled
        self.prompt_done_once = False  # its prompt's full blocks have been computed (and cached) once
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.error: str | None = None
        self.order = order  # admission order: tie-breaker after arrival_time
        self.block_hashes: list[bytes] = []  # hashes of full blocks of all_token_ids, filled lazily
        self.max_model_len = max_model_len
        self.lora = req.lora_request  # LoRARequest.to_wire() or None (the base model)
        self.lora_id = int(req.lora_request["lora_int_id"]) if req.lora_request else 0
        self.spec_token_ids: list[int] = []  # speculative decoding: drafts to verify in the next step

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def setup(self) -> SeqSetup:
        return SeqSetup(
            params=self.params,
            prompt_token_ids=self.prompt_token_ids,
            output_token_ids=list(self.output_token_ids),
            seed=self.seed,
            eos_token_ids=self.eos_token_ids,
            lora=self.lora,
        )

    def check_stop(self, token: int) -> tuple[str | None, int | None]:
        """(finish_reason, stop_reason) after `token` was appended to the output, (None, None) to go on."""
        p = self.params
        n_out = len(self.output_token_ids)
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                return "stop", None
            if token in p.stop_token_ids:
                return "stop", token
        if p.max_tokens is not None and n_out >= p.max_tokens:
            return "length", None
        if self.num_tokens >= self.max_model_len:
            return "length", None
        return None, None

    def draft_room(self) -> int:
        """Most draft tokens the next step may verify: it emits up to k + 1 tokens, all within max_tokens and
        max_model_len."""
        room = self.max_model_len - self.num_tokens - 1
        if self.params.max_tokens is not None:
            room = min(room, self.params.max_tokens - len(self.output_token_ids) - 1)
        return max(0, room)

    def sort_key(self, use_priority: bool) -> tuple:
        """Smaller is served first; the largest running key is the first preemption victim."""
        base = (self.arrival_time, self.order, self.index)
        return (self.priority, *base) if use_priority else base

    def __repr__(self) -> str:
        return (f"Sequence({self.seq_id}, {self.status.value}, computed={self.num_computed_tokens}/"
                f"{self.num_tokens})")


class Request:
    """The sequences of one request; finished when all of them are."""

    __slots__ = ("request_id", "seqs")

    def __init__(self, request_id: str, seqs: list[Sequence]) -> None:
        self.request_id = request_id
        self.seqs = seqs

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)
