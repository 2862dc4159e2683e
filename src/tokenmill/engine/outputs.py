"""Stage contracts: scheduler -> model runner -> scheduler -> clients.

Plain dataclasses of ints, floats, strings and lists so they serialise (msgpack) when the engine core
runs in its own process. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenmill.kv_cache_spec import KVCacheGroupSpec
from tokenmill.sampling_params import SamplingParams

__all__ = ["KVCacheGroupSpec"]  # re-exported: the engine's stage contracts name it


@dataclass(slots=True)
class SeqSetup:
    """Everything the runner keeps about a sequence; sent when it (re)enters the batch.

    After a preemption by recompute the sequence is sent again with the tokens generated so far in
    `output_token_ids` (the runner needs them for penalties) and its generator re-seeded, so a seeded
    sample continues exactly where it stopped.
    """

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    seed: int | None  # effective seed for this sequence (params.seed + sample index), None: unseeded
    eos_token_ids: list[int] = field(default_factory=list)
    # Multi-LoRA: the adapter this sequence runs through as a plain dict {"lora_name", "lora_int_id",
    # "lora_path"} (tokenmill.lora.request.LoRARequest.to_wire()); None: the base model.
    lora: dict[str, Any] | None = None


@dataclass(slots=True)
class ScheduledSeq:
    """One sequence's share of one step.

    token_ids are the inputs this step (a prefill chunk, or the last sampled token for a decode),
    occupying positions start_pos .. start_pos + len(token_ids) - 1.
    block_ids holds one block table per KV cache group (see KVCacheGroupSpec); entries that a
    sliding-window group has released are NULL_BLOCK_ID.
    sample is True when the step ends this sequence's prompt (or it is decoding): the runner samples
    one token from the logits of the last input position.
    Speculative decoding: the last num_draft_tokens of token_ids are proposed (unverified) tokens; the runner
    then samples at the last 1 + num_draft_tokens positions and returns the accepted drafts plus one token
    of its own (1 .. num_draft_tokens + 1 SampledTokens for this sequence, in order).
    lora_id: the LoRA adapter's lora_int_id (0: the base model).
    """

    seq_id: str
    token_ids: list[int]
    start_pos: int
    block_ids: list[list[int]]
    sample: bool
    setup: SeqSetup | None = None
    prompt_logprobs: int | None = None  # top-k wanted for the prompt positions of this chunk (None: none wanted)
    num_draft_tokens: int = 0
    lora_id: int = 0

    @property
    def draft_ids(self) -> list[int]:
        k = self.num_draft_tokens
        return self.token_ids[len(self.token_ids) - k :] if k else []


@dataclass(slots=True)
class SchedulerOutput:
    seqs: list[ScheduledSeq]
    finished_seq_ids: list[str] = field(default_factory=list)  # runner drops their state
    # Structured output: this step's token mask for the sampled rows (structured_output.GrammarBitmask, holding
    # a tensor: in-process only, runner and scheduler share the core process); None: no constrained row.
    grammar_bitmask: Any = None

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


@dataclass(slots=True)
class SampledToken:
    seq_id: str
    token_id: int
    logprob: float | None = None  # log-probability of token_id (when logprobs was requested)
    top_logprobs: list[tuple[int, float]] | None = None  # best alternatives, highest first
    rank: int | None = None  # 1-based rank of token_id in the raw distribution (when logprobs was requested)


@dataclass(slots=True)
class PromptLogprobs:
    """Logprobs of prompt tokens start_pos + 1 .. start_pos + len(logprobs), each read from the logits at the
    position before it (one chunk of a prefill). top_ids / top_logprobs: the best alternatives, highest first."""

    seq_id: str
    start_pos: int
    logprobs: list[float]
    ranks: list[int]  # 1-based rank of each prompt token in its distribution
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


# One prompt position on the wire (msgpack): None for the first prompt token, else
# [token_id, logprob, rank, [[alt_id, alt_logprob], ...]] with the alternatives best first.
PromptLogprobRow = list | None


@dataclass(slots=True)
class ModelOutput:
    # One per ScheduledSeq with sample=True, in the same order; a sequence verifying draft tokens has 1 ..
    # num_draft_tokens + 1 consecutive entries (the accepted drafts, then the runner's own token).
    sampled: list[SampledToken]
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)  # for chunks with prompt_logprobs set
    # Speculative decoding: proposals for each sequence's next step (seq_id -> draft token ids), made after
    # this step's tokens; the scheduler may trim them (budget, max_tokens, grammar) or drop them.
    draft_token_ids: dict[str, list[int]] = field(default_factory=dict)


NULL_BLOCK_ID = 0  # reserved block, never handed out: placeholder for released sliding-window blocks


@dataclass(slots=True)
class SeqOutputDelta:
    """Core -> client: what one sequence produced this step."""

    request_id: str
    index: int  # sample index within the request (n > 1)
    new_token_ids: list[int]
    new_logprobs: list[float] | None = None
    new_top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None  # stop | length | abort | error
    stop_reason: int | str | None = None  # the stop token id, when one ended it
    error: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    new_ranks: list[int | None] | None = None  # 1-based rank of each new token (when logprobs was requested)
    # Every prompt position's logprobs (PromptLogprobRow), once, with sample 0's first token.
    prompt_logprobs: list[PromptLogprobRow] | None = None

    @classmethod
    def of_tokens(cls, request_id: str, index: int, tokens: list[SampledToken], finish_reason: str | None,
                  stop_reason: int | str | None, num_prompt_tokens: int, num_cached_tokens: int,
                  prompt_logprobs: list[PromptLogprobRow] | None) -> SeqOutputDelta:
        """The delta of one or more sampled tokens (several when speculative drafts were accepted)."""
        has_lp = tokens[0].logprob is not None
        return cls(
            request_id=request_id, index=index, new_token_ids=[t.token_id for t in tokens],
            new_logprobs=[t.logprob for t in tokens] if has_lp else None,
            new_top_logprobs=[list(t.top_logprobs or ()) for t in tokens] if tokens[0].top_logprobs is not None else None,
            new_ranks=[t.rank for t in tokens] if has_lp else None,
            finish_reason=finish_reason, stop_reason=stop_reason, num_prompt_tokens=num_prompt_tokens,
            num_cached_tokens=num_cached_tokens, prompt_logprobs=prompt_logprobs)


# ---- client-facing results (vLLM's shapes) ---------------------------------------------------------


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int | None = None  # 1-based rank in the distribution, when known
    decoded_token: str | None = None


@dataclass(slots=True)
class CompletionOutput:
    """One sample. From AsyncLLM.generate these are deltas (new text/tokens only); from LLM.generate, whole."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None  # stop | length | abort | error
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    # vLLM's shape: None for the first prompt token, then {token_id: Logprob} holding the prompt token and the
    # top-k alternatives. Streaming (AsyncLLM) carries it on the first output only.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    num_cached_tokens: int = 0


@dataclass(slots=True)
class EmbeddingOutput:
    embedding: list[float]


@dataclass(slots=True)
class EmbeddingRequestOutput:
    """vLLM's shape for LLM.embed(): `out.outputs.embedding` is the vector."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True
