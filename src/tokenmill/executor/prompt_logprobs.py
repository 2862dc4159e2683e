"""Prompt logprobs (vLLM's `prompt_logprobs`): the logprob, rank and top-k of every prompt token, read from
the logits at the position before it.

The runner computes logits only where it samples; a chunk whose ScheduledSeq asks for prompt logprobs also
gets logits at its prompt positions here. They are computed a few rows at a time: a full-vocabulary float32
row is ~1 MB for a 262k vocabulary, so a 2,000-token prompt at once would need ~2 GB.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.engine.outputs import PromptLogprobs, ScheduledSeq

_MAX_LOGIT_ELEMENTS = 1 << 24  # per slice of rows: 64 MB of float32 logits


@dataclass(slots=True)
class _Job:
    seq_id: str
    start_pos: int
    rows: list[int]  # flat batch rows whose logits predict the next prompt token
    targets: list[int]  # those next prompt tokens
    k: int


def _jobs(seqs: list[ScheduledSeq], prompts: dict[str, list[int]]) -> list[_Job]:
    """One job per chunk that asks for prompt logprobs and covers a position before the prompt's last token
    (the last prompt position predicts the first output token, which is not a prompt logprob)."""
    jobs, offset = [], 0
    for s in seqs:
        n = len(s.token_ids)
        if s.prompt_logprobs is not None:
            prompt = prompts[s.seq_id]
            end = min(s.start_pos + n, len(prompt) - 1)
            if end > s.start_pos:
                count = end - s.start_pos
                jobs.append(_Job(s.seq_id, s.start_pos, list(range(offset, offset + count)),
                                 prompt[s.start_pos + 1: end + 1], s.prompt_logprobs))
        offset += n
    return jobs


def compute_prompt_logprobs(model: torch.nn.Module, hidden: torch.Tensor, seqs: list[ScheduledSeq],
                            prompts: dict[str, list[int]]) -> list[PromptLogprobs]:
    """hidden [T, H]: the step's flat hidden states in `seqs` order; prompts: seq_id -> prompt token ids.
    Logprobs come from log_softmax of the raw logits (as the sampler's), ranks count strictly better tokens."""
    jobs = _jobs(seqs, prompts)
    if not jobs:
        return []
    rows = [r for j in jobs for r in j.rows]
    targets = torch.tensor([t for j in jobs for t in j.targets], dtype=torch.long, device=hidden.device)
    max_k = max(j.k for j in jobs)
    index = torch.tensor(rows, dtype=torch.long, device=hidden.device)
    # Even slices: a short tail slice would take the LM head's few-row path (8-bit activations for GGUF heads),
    # whose logits differ slightly from the many-row path's.
    cap = max(1, _MAX_LOGIT_ELEMENTS // max(1, model.config.vocab_size))
    step = -(-len(rows) // -(-len(rows) // cap))
    chosen, ranks, top_lp, top_ids = [], [], [], []
    for lo in range(0, len(rows), step):
        logprobs = torch.log_softmax(model.compute_logits(hidden.index_select(0, index[lo:lo + step])).float(), dim=-1)
        picked = logprobs.gather(1, targets[lo:lo + step, None])
        chosen.append(picked.squeeze(1))
        ranks.append((logprobs > picked).sum(dim=-1) + 1)
        if max_k > 0:
            values, ids = logprobs.topk(max_k, dim=-1)
            top_lp.append(values)
            top_ids.append(ids)
    return _split(jobs, torch.cat(chosen).tolist(), torch.cat(ranks).tolist(),
                  torch.cat(top_ids).tolist() if max_k else None, torch.cat(top_lp).tolist() if max_k else None)


def _split(jobs: list[_Job], chosen: list[float], ranks: list[int], top_ids: list[list[int]] | None,
           top_lp: list[list[float]] | None) -> list[PromptLogprobs]:
    out, at = [], 0
    for j in jobs:
        n = len(j.rows)
        ids = [row[: j.k] for row in top_ids[at:at + n]] if top_ids is not None else [[] for _ in range(n)]
        lps = [row[: j.k] for row in top_lp[at:at + n]] if top_lp is not None else [[] for _ in range(n)]
        out.append(PromptLogprobs(j.seq_id, j.start_pos, chosen[at:at + n], [int(r) for r in ranks[at:at + n]],
                                  ids, lps))
        at += n
    return out
