"""BERT encoder for sentence embeddings (task="embed"): all-MiniLM-L6-v2 and other BertModel checkpoints.

embed() follows the sentence-transformers recipe these models were trained for: token embeddings from
the last layer, mean-pooled over real (non-padding) tokens, then L2-normalised. Parameter names match the
checkpoint (a leading "bert." is stripped), so loading is a plain copy. Batches are formed from prompts
sorted by length, so padding stays small; results come back in the caller's order.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.layers.linear import copy_weight

_BATCH = 32
_SKIPPED = ("pooler.", "position_ids", "cls.")  # unused by mean pooling / buffers / MLM heads


class BertEmbeddings(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.token_type_embeddings.weight[0] + self.position_embeddings(pos)
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        split = lambda y: y.view(b, t, self.num_heads, h // self.num_heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)), attn_mask=mask)
        return out.transpose(1, 2).reshape(b, t, h)


class BertDenseNorm(nn.Module):
    """dense -> residual add -> LayerNorm (BERT's 'output' blocks)."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertDenseNorm(config.hidden_size, config.hidden_size, config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        act = getattr(config, "hidden_act", "gelu")
        if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"hidden_act={act!r}: BERT embeddings support gelu, gelu_new, gelu_pytorch_tanh")
        self.approximate = "none" if act == "gelu" else "tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x), approximate=self.approximate)


class BertLayer(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertDenseNorm(config.intermediate_size, config.hidden_size, config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertModel(nn.Module):
    """Encoder-only model; `embed` is its one entry point (no KV cache, no logits)."""

    TASK = "embed"

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.max_len = int(config.max_position_embeddings)
        self.pad_id = int(getattr(config, "pad_token_id", 0) or 0)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def encode(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """ids [B, T], valid [B, T] bool -> last hidden states [B, T, H]."""
        # Additive mask broadcast over heads and queries: padded keys get -inf-like weight.
        mask = torch.zeros(valid.shape, dtype=self.embeddings.LayerNorm.weight.dtype, device=ids.device)
        mask = mask.masked_fill(~valid, torch.finfo(mask.dtype).min)[:, None, None, :]
        x = self.embeddings(ids)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x

    def embed(self, token_id_lists: list[list[int]]) -> list[list[float]]:
        """Mean-pooled, L2-normalised sentence embeddings, one per token list, in input order."""
        for i, ids in enumerate(token_id_lists):
            if not ids:
                raise ValueError(f"input[{i}]: empty prompt; embeddings need at least one token")
            if len(ids) > self.max_len:
                raise ValueError(f"input[{i}]: {len(ids)} tokens exceeds the model's maximum of {self.max_len}")
        device = self.embeddings.word_embeddings.weight.device
        order = sorted(range(len(token_id_lists)), key=lambda i: len(token_id_lists[i]))
        out: list[list[float]] = [[] for _ in token_id_lists]
        for start in range(0, len(order), _BATCH):
            chunk = order[start : start + _BATCH]
            width = max(len(token_id_lists[i]) for i in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            valid = torch.zeros((len(chunk), width), dtype=torch.bool)
            for row, i in enumerate(chunk):
                n = len(token_id_lists[i])
                ids[row, :n] = torch.tensor(token_id_lists[i])
                valid[row, :n] = True
            ids, valid = ids.to(device), valid.to(device)
            hidden = self.encode(ids, valid).float()
            w = valid.unsqueeze(-1).float()
            pooled = (hidden * w).sum(1) / w.sum(1).clamp(min=1e-9)
            vecs = F.normalize(pooled, p=2, dim=-1).cpu().tolist()
            for row, i in enumerate(chunk):
                out[i] = vecs[row]
        return out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("bert.")
            if name.startswith(_SKIPPED) or name.endswith("position_ids"):
                continue
            if name not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no matching parameter in BertModel")
            copy_weight(params[name], tensor, name)
            loaded.add(name)
        return loaded

    def expected_weights(self) -> set[str]:
        return {name for name, _ in self.named_parameters()}
