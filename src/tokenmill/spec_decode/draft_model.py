"""DraftModelProposer: a smaller model with the target's vocabulary proposes k tokens greedily.

It runs in the engine core process next to the target, with its own paged KV cache (draft_kv.py). Each
propose() call brings every sequence's draft KV in step with its verified history (keep the common prefix,
feed what is missing as one prefill chunk), then decodes k tokens by argmax: all sequences of the call share
each forward, so a call costs at most k forwards of the draft (the first one also carries the prefill chunks).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tokenmill.config import AUTO_KV_CACHE_MEMORY_GIB, ModelConfig, SpeculativeConfig
from tokenmill.executor.precision import dtype_name
from tokenmill.kernels.cpu_kernels import load_cpu_kernels
from tokenmill.kernels.metadata import AttentionMetadata
from tokenmill.layers.attention import ForwardContext
from tokenmill.layers.linear import prepare_linears_for_cpu
from tokenmill.model.loader import LoadedModel, load_model
from tokenmill.spec_decode.draft_kv import DraftKVCache, DraftSeq
from tokenmill.spec_decode.proposer import ProposalInput

# Token strings compared between the two tokenizers at load: the first and last ids (specials and added tokens
# sit there) and an even stride through the rest. A few thousand lookups: milliseconds even for 262k vocabularies.
_VOCAB_EDGE_IDS = 256
_VOCAB_STRIDE_SAMPLES = 1024
_SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


class DraftModelProposer:
    """Proposer (spec_decode/proposer.py) backed by a draft model.

    Invariants: a sequence's draft KV holds a prefix of what it was last fed (its verified history, then its
    drafts but the last); proposals are ids of the shared vocabulary (check_vocabularies); after release()
    of every sequence the block free list is full again.
    KV budget: blocks for max_num_seqs sequences of the draft's max_model_len, capped at kv_cache_memory_gib
    (None: config.AUTO_KV_CACHE_MEMORY_GIB); num_blocks overrides both. When blocks run short, sequences
    outside the current call are evicted (least recently proposed first) and prefill again when next asked.
    Threads: the draft runs in the caller's process and thread, under the torch thread count the runner set.
    """

    def __init__(self, config: SpeculativeConfig, target: LoadedModel, *, max_num_seqs: int, block_size: int = 16,
                 kv_cache_memory_gib: float | None = None, num_blocks: int | None = None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None, attn_backend: str = "fast"):
        if not config.model:
            raise ValueError("speculative_config.model: a draft model needs a path (HF folder or .gguf file)")
        device = device if device is not None else target.device
        dtype = dtype if dtype is not None else target.dtype  # the target's dtype policy, already resolved
        self.draft = load_model(ModelConfig(model=config.model, dtype=dtype_name(dtype), device=str(device)))
        if self.draft.task != "generate":
            raise ValueError(f"speculative_config.model: {config.model!r} is a {self.draft.task} model; "
                             "a draft model must generate text")
        self.vocab_limit = check_vocabularies(self.draft, target, config.model)
        self.target = target
        self.model = self.draft.model
        self.device = self.draft.device
        self.attn_backend = attn_backend
        self.cpu_kernels = self._prepare_for_cpu()
        shapes = self.model.kv_layer_shapes()
        if num_blocks is None:
            per_block = DraftKVCache.block_bytes(shapes, block_size, self.draft.dtype)
            budget_gib = kv_cache_memory_gib if kv_cache_memory_gib is not None else AUTO_KV_CACHE_MEMORY_GIB
            wanted = max_num_seqs * math.ceil(self.max_model_len / block_size)
            num_blocks = 1 + max(1, min(wanted, int(budget_gib * 2**30) // per_block))
        self.kv = DraftKVCache(self.model.kv_cache_groups(), shapes, num_blocks, block_size, self.draft.dtype,
                               self.device)

    def _prepare_for_cpu(self):
        """The model runner's CPU preparation (weight layouts, native norms and decode attention), so the draft
        takes the same fast paths; returns the native kernels, or None."""
        if self.device.type != "cpu":
            return None
        kernels = None
        if self.attn_backend == "fast" and self.draft.dtype in (torch.float32, torch.bfloat16):
            kernels = load_cpu_kernels()
        prepare_linears_for_cpu(self.model, kernels, final=True)
        if kernels is not None:
            for module in self.model.modules():
                if hasattr(module, "use_cpu_kernels"):
                    module.use_cpu_kernels(kernels)
        return kernels

    @property
    def max_model_len(self) -> int:
        """Positions the draft may hold: its own limit, and never past the target's (read live: the runner may
        lower the target's when its KV cache is small)."""
        return min(self.draft.max_model_len, self.target.max_model_len)

    def release(self, seq_id: str) -> None:
        self.kv.release(seq_id)

    def propose(self, batch: list[ProposalInput]) -> dict[str, list[int]]:
        with torch.inference_mode():
            return self._propose(batch)

    def _propose(self, batch: list[ProposalInput]) -> dict[str, list[int]]:
        busy = {inp.seq_id for inp in batch}
        max_len = self.max_model_len
        runs: list[tuple[str, DraftSeq, int, list[int]]] = []  # (seq_id, state, k, tokens to feed first)
        for inp in batch:
            n = len(inp.token_ids)
            if n == 0 or inp.max_tokens <= 0:
                continue
            # Draft j is sampled after feeding position n + j - 2: k drafts need positions < n + k - 1 <= max_len.
            k = min(inp.max_tokens, max_len + 1 - n)
            if k <= 0:
                self.kv.release(inp.seq_id)  # the history no longer fits the draft: it will never propose again
                continue
            seq = self.kv.get(inp.seq_id)
            # Rejected drafts vanish from token_ids: keep only what still agrees, and at least one token to feed.
            keep = min(common_prefix_len(seq.token_ids, inp.token_ids), n - 1)
            self.kv.truncate(seq, keep)
            if not self.kv.reserve(seq, n + k - 1, busy):
                self.kv.release(inp.seq_id)  # no room even after evicting idle sequences: no drafts this step
                continue
            runs.append((inp.seq_id, seq, k, inp.token_ids[keep:]))
        drafts: dict[str, list[int]] = {seq_id: [] for seq_id, *_ in runs}
        feeds = [(seq, first) for _, seq, _, first in runs]
        active = runs
        try:
            while active:
                tokens = self._forward(feeds)
                for (seq_id, *_), token in zip(active, tokens):
                    drafts[seq_id].append(token)
                active = [r for r in active if len(drafts[r[0]]) < r[2]]
                feeds = [(seq, [drafts[seq_id][-1]]) for seq_id, seq, _, _ in active]
        except BaseException:
            for seq_id, *_ in runs:  # their token lists may name K/V never written: start them afresh
                self.kv.release(seq_id)
            raise
        return drafts

    def _forward(self, feeds: list[tuple[DraftSeq, list[int]]]) -> list[int]:
        """One forward of the draft over every sequence's fed tokens (appended to its state); the argmax token
        after each sequence's last one. One host sync (the final tolist)."""
        ids: list[int] = []
        positions: list[int] = []
        last: list[int] = []
        query_lens: list[int] = []
        starts: list[int] = []
        for seq, tokens in feeds:
            start = len(seq.token_ids)
            ids.extend(tokens)
            positions.extend(range(start, start + len(tokens)))
            last.append(len(ids) - 1)
            query_lens.append(len(tokens))
            starts.append(start)
            seq.token_ids.extend(tokens)
        tables = [seq.block_ids for seq, _ in feeds]
        metadata = [AttentionMetadata.build(query_lens, starts, tables, self.kv.block_size, g.sliding_window,
                                            self.device) for g in self.kv.groups]
        ctx = ForwardContext(metadata, self.kv.layer_to_group, self.kv.kv_caches, self.attn_backend, self.cpu_kernels)
        dev = self.device
        hidden = self.model(torch.tensor(ids, dtype=torch.long, device=dev),
                            torch.tensor(positions, dtype=torch.long, device=dev), ctx)
        logits = self.model.compute_logits(hidden.index_select(0, torch.tensor(last, dtype=torch.long, device=dev)))
        return logits[:, : self.vocab_limit].argmax(dim=-1).tolist()


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix (list equality runs in C; numpy only when they differ)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return int(np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))[0])


def check_vocabularies(draft: LoadedModel, target: LoadedModel, draft_name: str) -> int:
    """ValueError unless the draft proposes in the target's vocabulary; returns how many ids it may propose.

    Compared: the usable vocabulary sizes (usable_ids), and with both tokenizers the special ids and the token
    strings of a sample of ids. Embedding widths may differ past the usable ids (padding): never proposed."""
    size_d, size_t = usable_ids(draft), usable_ids(target)
    dt, tt = draft.tokenizer, target.tokenizer
    problem = None
    if size_d != size_t:
        problem = f"usable vocabulary sizes differ: {size_d} vs {size_t}"
    elif dt is not None and tt is not None:
        special = [name for name in _SPECIAL_TOKENS if getattr(dt, name, None) != getattr(tt, name, None)]
        if special:
            problem = "special token ids differ: " + ", ".join(
                f"{name} {getattr(dt, name, None)} vs {getattr(tt, name, None)}" for name in special)
        else:
            ids = sample_ids(size_t)
            for i, d, t in zip(ids, dt.convert_ids_to_tokens(ids), tt.convert_ids_to_tokens(ids)):
                if d != t:
                    problem = f"token {i} is {d!r} in the draft and {t!r} in the target"
                    break
    if problem is not None:
        raise ValueError(
            f"speculative_config.model: the draft model {draft_name!r} ({_describe(draft)}) and the target model "
            f"{target.path or target.arch!r} ({_describe(target)}) do not share a vocabulary ({problem}); a draft "
            "model must use the target's tokenizer: same vocabulary size, token strings and special token ids")
    return size_t


def usable_ids(loaded: LoadedModel) -> int:
    """Ids a model can both read and name: its embedding rows, cut at its tokenizer's size. Checkpoints pad
    the embedding (Qwen2.5: 151,936 rows for 151,665 tokens), and tokenizer conversions may add tokens past
    it (transformers' GGUF conversion of a byte-level BPE appends <|endoftext|>): neither is vocabulary."""
    if loaded.tokenizer is None:
        return loaded.vocab_size
    return min(loaded.vocab_size, len(loaded.tokenizer))


def sample_ids(size: int) -> list[int]:
    """Ids whose token strings are compared: both ends and an even stride between them."""
    stride = max(1, size // _VOCAB_STRIDE_SAMPLES)
    edges = set(range(min(_VOCAB_EDGE_IDS, size))) | set(range(max(0, size - _VOCAB_EDGE_IDS), size))
    return sorted(edges | set(range(0, size, stride)))


def _describe(loaded: LoadedModel) -> str:
    tokens = f"tokenizer of {len(loaded.tokenizer)} tokens, " if loaded.tokenizer is not None else "no tokenizer, "
    return f"{tokens}vocab_size {loaded.vocab_size}"
