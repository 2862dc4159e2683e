"""The proposer interface: what the model runner asks of any speculative-decoding method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(slots=True)
class ProposalInput:
    """One sequence that just produced verified tokens.

    token_ids: its whole verified history, prompt then output (the token the runner just sampled last).
    The proposer keeps per-sequence state keyed by seq_id and must treat token_ids as the truth: after a
    rejection, tokens it proposed earlier are simply absent (roll its own state back to the common prefix).
    max_tokens: at most this many drafts (the step's k, already lowered near max_tokens / max_model_len).
    """

    seq_id: str
    token_ids: list[int]
    max_tokens: int


class Proposer(Protocol):
    def propose(self, batch: list[ProposalInput]) -> dict[str, list[int]]:
        """Drafts per seq_id (absent or empty: nothing worth proposing). Deterministic proposals (one token
        per position, no distribution): verification treats them as one-hot."""
        ...

    def release(self, seq_id: str) -> None:
        """The sequence finished, was aborted or preempted: drop what is kept for it (draft KV blocks)."""
        ...


def build_proposer(config: Any, loaded: Any) -> Proposer:
    """The proposer named by config.speculative (an EngineConfig) for the target model `loaded`."""
    spec = config.speculative
    if spec.method == "ngram":
        from tokenmill.spec_decode.ngram import NgramProposer

        return NgramProposer(spec)
    if spec.method == "draft_model":
        from tokenmill.spec_decode.draft_model import DraftModelProposer

        return DraftModelProposer(spec, loaded, max_num_seqs=config.scheduler.max_num_seqs,
                                  block_size=config.cache.block_size)
    raise ValueError(f"invalid speculative method={spec.method!r}: must be 'ngram' or 'draft_model'")
