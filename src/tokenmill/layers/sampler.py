"""Batched per-request sampling with one host sync per step.

Order (as vLLM): structured-output grammar mask -> logit_bias and min_tokens masks -> repetition / frequency /
presence penalties -> greedy argmax for greedy rows; for the rest temperature -> min_p -> top_k -> top_p ->
inverse-CDF sampling with one uniform draw per row, drawn for a seeded row from that row's own generator so its
tokens do not depend on its batch mates. Logprobs come from log_softmax of the raw model logits (after only the
grammar mask, as vLLM).
No full-vocabulary sort unless top_p asks for it; top_k uses torch.topk.
Penalty counts are kept per sequence across steps (layers/penalties.py), not rebuilt from the history.
A row whose every token is masked (grammar, min_tokens) yields the argmax of the raw model logits and, with
logprobs, -inf for every token (reported as -9999): never NaN, never an id outside the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenmill.kernels.cpu_kernels import CpuKernels
from tokenmill.layers.penalties import PenaltyCounts
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured_output.manager import GrammarBitmask, apply_bitmask


@dataclass(slots=True)
class SeqSamplingState:
    """What the sampler remembers about one sequence across steps."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    eos_token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None  # set for seeded sequences; reseeded per output index
    seed: int | None = None
    penalty_row: int = -1  # this sequence's row in the sampler's PenaltyCounts (-1: none taken)
    num_counted: int = 0  # output tokens already in that row's counts


@dataclass(slots=True)
class SampledRow:
    token_id: int
    logprob: float | None
    rank: int | None
    top_logprobs: list[tuple[int, float]] | None


def needs_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device, cpu_kernels: CpuKernels | None = None):
        self.vocab_size = vocab_size
        self.device = device
        self.cpu_kernels = cpu_kernels  # native argmax over wide rows (several times torch's on CPU)
        self.penalty_counts = PenaltyCounts(vocab_size, device)

    def release(self, state: SeqSamplingState) -> None:
        """The sequence left the batch (finished, aborted or preempted): free what the sampler kept for it."""
        self.penalty_counts.release(state)

    def _argmax(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_kernels is not None and x.device.type == "cpu" and x.dtype == torch.float32 and x.stride(-1) == 1:
            return self.cpu_kernels.argmax_rows(x)
        return x.argmax(dim=-1)

    def __call__(self, logits: torch.Tensor, states: list[SeqSamplingState], generator: torch.Generator | None = None,
                 grammar_bitmask: GrammarBitmask | None = None) -> list[SampledRow]:
        """logits [B, V] float32 (rows in `states` order; modified in place). One host sync.
        grammar_bitmask: structured output's mask for the constrained rows, applied before anything else."""
        num_rows = logits.shape[0]
        params = [s.params for s in states]
        # Only masks can leave a row with no allowed token (finite logits, bias in [-100, 100]); such a row falls
        # back to the model's own top token, so the step never yields NaN or an out-of-vocabulary id.
        fallback = self._argmax(logits) if grammar_bitmask is not None or self._holds_back_ids(states) else None
        if grammar_bitmask is not None:
            apply_bitmask(logits, grammar_bitmask)
        want_lp = [p.logprobs is not None for p in params]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_lp) else None
        if raw_logprobs is not None and grammar_bitmask is not None:
            raw_logprobs.nan_to_num_(nan=float("-inf"))  # an all-masked row: every token impossible, not NaN
        self._apply_bias_and_min_tokens(logits, states)
        self._apply_penalties(logits, states)
        dead = torch.isneginf(logits.amax(dim=-1)) if fallback is not None else None

        tokens = torch.empty(num_rows, dtype=torch.long, device=logits.device)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        rand = [i for i, p in enumerate(params) if not p.greedy]
        if len(greedy) == num_rows:
            tokens = self._argmax(logits)
        elif greedy:
            idx = torch.tensor(greedy, device=logits.device)
            tokens[idx] = self._argmax(logits[idx])
        if rand:
            idx = torch.tensor(rand, device=logits.device)
            x = logits if len(rand) == num_rows else logits[idx]
            tokens[idx] = self._sample_random(x, [states[i] for i in rand], generator)

        if dead is not None:
            tokens = torch.where(dead, fallback, tokens)
        packed = [tokens.to(torch.float64)[:, None]]
        max_k = max((p.logprobs or 0) for p in params)
        if raw_logprobs is not None:
            chosen = raw_logprobs.gather(1, tokens[:, None])
            rank = (raw_logprobs > chosen).sum(dim=-1, keepdim=True) + 1
            packed += [chosen.to(torch.float64), rank.to(torch.float64)]
            if max_k > 0:
                top_lp, top_ids = raw_logprobs.topk(max_k, dim=-1)
                packed += [top_ids.to(torch.float64), top_lp.to(torch.float64)]
        host = torch.cat(packed, dim=1).tolist()  # the one host sync of the step
        return [self._unpack(row, params[i], raw_logprobs is not None, max_k) for i, row in enumerate(host)]

    @staticmethod
    def _unpack(row: list[float], p: SamplingParams, has_lp: bool, max_k: int) -> SampledRow:
        token = int(row[0])
        if not has_lp or p.logprobs is None:
            return SampledRow(token, None, None, None)
        k = p.logprobs
        top = [(int(row[3 + j]), row[3 + max_k + j]) for j in range(k)] if k else []
        return SampledRow(token, row[1], int(row[2]), top)

    @staticmethod
    def _holds_back_ids(states: list[SeqSamplingState]) -> bool:
        return any(len(s.output_token_ids) < s.params.min_tokens for s in states)

    def _apply_bias_and_min_tokens(self, logits: torch.Tensor, states: list[SeqSamplingState]) -> None:
        rows: list[int] = []
        cols: list[int] = []
        vals: list[float] = []
        mask_rows: list[int] = []
        mask_cols: list[int] = []
        for i, s in enumerate(states):
            p = s.params
            if p.logit_bias:
                for tid, bias in p.logit_bias.items():
                    if tid < self.vocab_size:
                        rows.append(i)
                        cols.append(tid)
                        vals.append(bias)
            if len(s.output_token_ids) < p.min_tokens:
                for tid in set(s.eos_token_ids) | set(p.stop_token_ids):
                    if tid < self.vocab_size:
                        mask_rows.append(i)
                        mask_cols.append(tid)
        dev = logits.device
        if rows:
            logits.index_put_((torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)),
                              torch.tensor(vals, device=dev, dtype=logits.dtype), accumulate=True)
        if mask_rows:
            logits[torch.tensor(mask_rows, device=dev), torch.tensor(mask_cols, device=dev)] = float("-inf")

    def _apply_penalties(self, logits: torch.Tensor, states: list[SeqSamplingState]) -> None:
        which = [i for i, s in enumerate(states) if needs_penalties(s.params)]
        if not which:
            return
        dev = logits.device
        out_counts, prompt_seen = self.penalty_counts.rows_for([states[i] for i in which])
        x = logits[torch.tensor(which, device=dev)] if len(which) < len(states) else logits
        p_list = [states[i].params for i in which]
        rep = torch.tensor([p.repetition_penalty for p in p_list], device=dev)[:, None]
        present = out_counts > 0
        if any(p.repetition_penalty != 1.0 for p in p_list):
            penalised = torch.where(x > 0, x / rep, x * rep)
            x = torch.where(prompt_seen.logical_or_(present), penalised, x)
        freq = torch.tensor([p.frequency_penalty for p in p_list], device=dev)[:, None]
        pres = torch.tensor([p.presence_penalty for p in p_list], device=dev)[:, None]
        # In place on the fresh row copies (out_counts, x unless it is logits itself): 8 MB temporaries per
        # 8 rows of a 262k vocabulary cost more than the arithmetic. Same operation order as x - f*c - p*[c>0].
        x = x.sub_(out_counts.mul_(freq)).sub_(present.to(x.dtype).mul_(pres))
        if len(which) < len(states):
            logits[torch.tensor(which, device=dev)] = x
        elif x is not logits:
            logits.copy_(x)

    def _sample_random(self, x: torch.Tensor, states: list[SeqSamplingState], generator: torch.Generator | None) -> torch.Tensor:
        dev = x.device
        p_list = [s.params for s in states]
        if any(p.temperature != 1.0 for p in p_list):  # (x / 1.0 is x: a pass over [rows, vocab] saved)
            x = x.div_(torch.tensor([p.temperature for p in p_list], device=dev, dtype=x.dtype)[:, None])  # ours to modify
        if any(p.min_p > 0 for p in p_list):
            probs = torch.softmax(x, dim=-1)
            min_p = torch.tensor([p.min_p for p in p_list], device=dev, dtype=x.dtype)[:, None]
            x = x.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
        if any(p.top_k > 0 for p in p_list):
            ks = [min(p.top_k, x.shape[1]) if p.top_k > 0 else x.shape[1] for p in p_list]
            values = x.topk(max(ks), dim=-1).values
            kth = values.gather(1, torch.tensor(ks, device=dev)[:, None] - 1)
            x = x.masked_fill(x < kth, float("-inf"))
        if any(p.top_p < 1.0 for p in p_list):
            x = _top_p(x, torch.tensor([p.top_p for p in p_list], device=dev, dtype=x.dtype))
        # Inverse-CDF sampling: one uniform per row (a seeded row draws from its own generator, so its token
        # does not depend on batch mates). The exponential race (argmax(probs / Exp(1) noise)) needs one random
        # draw per vocabulary entry: with 262k-entry vocabularies that dominated the step on CPU. Everything
        # runs in place on x (logits or a row copy the caller no longer reads): fresh 67 MB temporaries cost
        # more in page faults than the arithmetic. The cdf is unnormalised: u is scaled by its total.
        u = self._uniforms(states, generator, dev, x.dtype)
        if self.cpu_kernels is not None and x.is_cpu and x.dtype is torch.float32 and x.stride(-1) == 1:
            return self.cpu_kernels.sample_rows(x, u)  # the same draw without the full exp / cumsum passes
        amax = x.amax(dim=-1, keepdim=True)
        # An all -inf row would turn into NaN (-inf - -inf); as zeros it samples past the end, clamped below
        # (the caller replaces that token with the row's fallback).
        cdf = x.sub_(amax.masked_fill_(torch.isneginf(amax), 0.0)).exp_().cumsum_(dim=-1)
        total = cdf[:, -1]
        # First index whose cdf exceeds u * total: never a zero-probability token (its cdf equals its
        # predecessor's); the bound below total keeps float rounding from running past the last token.
        target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
        return torch.searchsorted(cdf, target[:, None], right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)

    @staticmethod
    def _uniforms(states: list[SeqSamplingState], generator: torch.Generator | None, dev: torch.device,
                  dtype: torch.dtype) -> torch.Tensor:
        """One uniform per row: a seeded row draws from its own generator (its token does not depend on batch mates)."""
        u = torch.empty(len(states), device=dev, dtype=dtype)
        unseeded = [i for i, s in enumerate(states) if s.generator is None]
        for i, s in enumerate(states):
            if s.generator is not None:
                u[i] = torch.rand((), generator=s.generator, device=dev, dtype=dtype)
        if unseeded:
            u[torch.tensor(unseeded, device=dev)] = torch.rand(len(unseeded), generator=generator, device=dev,
                                                               dtype=dtype)
        return u


def _top_p(x: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of highest-probability tokens whose mass reaches top_p (always >= 1 token)."""
    sorted_x, order = x.sort(dim=-1, descending=True)
    probs = torch.softmax(sorted_x, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= top_p[:, None]
    drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
    return x.masked_fill(drop, float("-inf"))
