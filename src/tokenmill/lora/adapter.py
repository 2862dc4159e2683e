"""PEFT LoRA adapters: adapter_config.json + adapter_model.safetensors -> validated per-module A/B tensors.

Tensors keep HF module names (model.layers.N.self_attn.q_proj ...); lora/layers.py maps each onto a shard of
our fused layers (qkv_proj holds q, k, v; gate_up_proj holds gate, up). The scaling (lora_alpha / r, or
lora_alpha / sqrt(r) with rslora) is folded into B here, so applying an adapter is x @ A^T @ B^T.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"

# The seven decoder projections an adapter may target (HF names, as PEFT's target_modules spells them).
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Modules PEFT can adapt that the batched apply does not cover, with why.
_UNSUPPORTED_TARGETS = {
    "embed_tokens": "LoRA on the embeddings (embed_tokens) is not supported",
    "lm_head": "LoRA on the LM head (lm_head) is not supported",
}
# adapter_config.json options that change the math beyond A/B + scaling: rejected, never ignored.
_UNSUPPORTED_OPTIONS = ("use_dora", "lora_bias", "modules_to_save", "trainable_token_indices", "layer_replication",
                        "target_parameters", "megatron_config", "use_qalora", "alora_invocation_tokens")
# base_model.model.<module>.lora_A[.<adapter name>].weight, as PEFT's save_pretrained writes them.
_TENSOR = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.[^.]+)?\.weight$")
_LAYER_MODULE = re.compile(r"(?:^|\.)layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<target>\w+)$")


class LoRAAdapterError(ValueError):
    """A malformed or unsupported adapter: `file` names the file, `problem` says what is wrong and what is allowed."""

    def __init__(self, file: str | Path, problem: str):
        self.file = str(file)
        self.problem = problem
        super().__init__(f"{self.file}: {problem}")


@dataclass(frozen=True, slots=True)
class TargetShape:
    """(in_features, out_features) of one HF projection in the base model (e.g. q_proj: hidden -> q heads)."""

    in_features: int
    out_features: int


@dataclass(frozen=True, slots=True)
class BaseShapes:
    """What an adapter must fit: the number of decoder layers and the shape of each projection."""

    num_layers: int
    targets: dict[str, TargetShape]


@dataclass(frozen=True, slots=True)
class LoRAModuleWeights:
    """One adapted projection: a [r, in] and b [out, r] with the scaling already folded into b."""

    layer: int
    target: str  # HF name: q_proj ... down_proj
    a: torch.Tensor
    b: torch.Tensor

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True, slots=True)
class LoRAAdapter:
    """A parsed adapter; modules keyed by (layer, target). num_bytes: the A/B tensors as kept in memory."""

    path: str
    rank: int
    modules: dict[tuple[int, str], LoRAModuleWeights]

    @property
    def num_bytes(self) -> int:
        return sum(m.a.numel() * m.a.element_size() + m.b.numel() * m.b.element_size() for m in self.modules.values())


def read_adapter_config(path: str | Path, max_rank: int) -> dict:
    """adapter_config.json, validated: PEFT type LORA, supported targets and options, r <= max_rank."""
    folder = Path(path)
    file = folder / CONFIG_FILE
    if not folder.is_dir():
        raise LoRAAdapterError(folder, "not a directory; lora_path must be a PEFT adapter folder "
                                       f"({CONFIG_FILE} + {WEIGHTS_FILE})")
    if not file.is_file():
        raise LoRAAdapterError(file, "missing; a PEFT adapter folder holds adapter_config.json")
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoRAAdapterError(file, f"invalid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise LoRAAdapterError(file, "must hold a JSON object")
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise LoRAAdapterError(file, f"peft_type={cfg.get('peft_type')!r}: only LORA adapters are supported")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise LoRAAdapterError(file, f"r={r!r}: must be an integer >= 1")
    if not isinstance(cfg.get("lora_alpha", r), (int, float)):
        raise LoRAAdapterError(file, f"lora_alpha={cfg.get('lora_alpha')!r}: must be a number")
    _check_pattern(file, cfg, "rank_pattern", int, "a positive integer")
    _check_pattern(file, cfg, "alpha_pattern", (int, float), "a number")
    ranks = [r, *(cfg.get("rank_pattern") or {}).values()]
    if max(ranks) > max_rank:
        raise LoRAAdapterError(file, f"rank {max(ranks)} exceeds max_lora_rank={max_rank}; raise --max-lora-rank")
    if cfg.get("bias", "none") != "none":
        raise LoRAAdapterError(file, f"bias={cfg.get('bias')!r}: only bias='none' is supported")
    if cfg.get("fan_in_fan_out"):
        raise LoRAAdapterError(file, "fan_in_fan_out=true: the base layers are nn.Linear; only false is supported")
    for option in _UNSUPPORTED_OPTIONS:
        if cfg.get(option):
            raise LoRAAdapterError(file, f"{option}={cfg[option]!r} is not supported; "
                                         "only plain LoRA (A/B, lora_alpha, use_rslora, rank/alpha patterns)")
    _check_targets(file, cfg.get("target_modules"))
    return cfg


def _check_pattern(file: Path, cfg: dict, key: str, kind: type | tuple[type, ...], what: str) -> None:
    """rank_pattern / alpha_pattern: {module regex: value}, as PEFT matches them."""
    pattern = cfg.get(key) or {}
    if not isinstance(pattern, dict):
        raise LoRAAdapterError(file, f"{key}={pattern!r}: must be an object {{module name or regex: value}}")
    for name, value in pattern.items():
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 1):
            raise LoRAAdapterError(file, f"{key}[{name!r}]={value!r}: must be {what}")
        try:
            re.compile(name)
        except re.error as e:
            raise LoRAAdapterError(file, f"{key}: {name!r} is not a valid regex ({e})") from e


def _check_targets(file: Path, targets: object) -> None:
    """A list must name supported projections; a regex string (or 'all-linear') is checked per tensor instead."""
    if targets is None or isinstance(targets, str):
        return
    if not isinstance(targets, list):
        raise LoRAAdapterError(file, f"target_modules={targets!r}: must be a list of module names or a regex string")
    for t in targets:
        name = str(t).rsplit(".", 1)[-1]
        if name in _UNSUPPORTED_TARGETS:
            raise LoRAAdapterError(file, f"target_modules: {_UNSUPPORTED_TARGETS[name]}; supported: "
                                         f"{', '.join(TARGET_MODULES)}")
        if name not in TARGET_MODULES:
            raise LoRAAdapterError(file, f"target_modules: {t!r} is not supported; supported: {', '.join(TARGET_MODULES)}")


def load_adapter(path: str | Path, max_rank: int, shapes: BaseShapes | None = None,
                 dtype: torch.dtype = torch.float32) -> LoRAAdapter:
    """Parse and validate a PEFT adapter folder. With `shapes`, every A/B must fit the base model's layer
    (an adapter trained on another base fails here, not mid-step)."""
    try:
        return _load(path, max_rank, shapes, dtype)
    except OSError as e:  # a path the OS refuses (too long, no permission...): the caller's input all the same
        raise LoRAAdapterError(e.filename or path, f"cannot be read ({e.strerror or e}); lora_path must be a "
                                                   "readable PEFT adapter folder") from e


def _load(path: str | Path, max_rank: int, shapes: BaseShapes | None, dtype: torch.dtype) -> LoRAAdapter:
    cfg = read_adapter_config(path, max_rank)
    folder = Path(path)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        if (folder / PICKLE_WEIGHTS_FILE).is_file():
            raise LoRAAdapterError(folder / PICKLE_WEIGHTS_FILE, "pickle weights are not supported; save the adapter "
                                                                 "with safe_serialization=True (adapter_model.safetensors)")
        raise LoRAAdapterError(weights, "missing; a PEFT adapter folder holds adapter_model.safetensors")
    tensors = _read_tensors(weights)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        layer, target, kind = _parse_name(weights, name)
        if shapes is not None and layer >= shapes.num_layers:
            raise LoRAAdapterError(weights, f"{name}: layer {layer} is beyond the base model's "
                                            f"{shapes.num_layers} layers (an adapter for another base model?)")
        pairs.setdefault((layer, target), {})[kind] = tensor
    if not pairs:
        raise LoRAAdapterError(weights, "holds no lora_A / lora_B tensors")
    modules = {key: _module(weights, cfg, key, pair, max_rank, shapes, dtype) for key, pair in sorted(pairs.items())}
    return LoRAAdapter(str(folder), max(m.rank for m in modules.values()), modules)


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise LoRAAdapterError(file, f"not a readable safetensors file ({e})") from e


def _parse_name(file: Path, name: str) -> tuple[int, str, str]:
    """(layer, HF target, lora_A | lora_B) of a tensor name; anything else is an unsupported module."""
    m = _TENSOR.match(name)
    module = m.group("module") if m else name
    for key, why in _UNSUPPORTED_TARGETS.items():
        if re.search(rf"(^|\.){key}(\.|$)", module):
            raise LoRAAdapterError(file, f"{name}: {why}; supported: {', '.join(TARGET_MODULES)}")
    lm = _LAYER_MODULE.search(module) if m else None
    if m is None or lm is None or lm.group("target") not in TARGET_MODULES:
        raise LoRAAdapterError(file, f"{name}: not a LoRA tensor of a supported module; supported: "
                                     f"lora_A / lora_B of {', '.join(TARGET_MODULES)} in model.layers.N")
    return int(lm.group("layer")), lm.group("target"), m.group("kind")


def _module(file: Path, cfg: dict, key: tuple[int, str], pair: dict[str, torch.Tensor], max_rank: int,
            shapes: BaseShapes | None, dtype: torch.dtype) -> LoRAModuleWeights:
    layer, target = key
    where = f"model.layers.{layer}.{'mlp' if target in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{target}"
    if set(pair) != {"lora_A", "lora_B"}:
        missing = ({"lora_A", "lora_B"} - set(pair)).pop()
        raise LoRAAdapterError(file, f"{where}: {missing} is missing (each module needs lora_A and lora_B)")
    a, b = pair["lora_A"], pair["lora_B"]
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise LoRAAdapterError(file, f"{where}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not "
                                     "form a LoRA pair ([r, in] and [out, r])")
    rank = a.shape[0]
    if rank > max_rank:
        raise LoRAAdapterError(file, f"{where}: rank {rank} exceeds max_lora_rank={max_rank}; raise --max-lora-rank")
    if shapes is not None:
        want = shapes.targets.get(target)
        if want is None:
            raise LoRAAdapterError(file, f"{where}: the base model has no {target}")
        if a.shape[1] != want.in_features or b.shape[0] != want.out_features:
            raise LoRAAdapterError(file, f"{where}: A/B map {a.shape[1]} -> {b.shape[0]} features but the base "
                                         f"model's {target} maps {want.in_features} -> {want.out_features} "
                                         "(an adapter for another base model?)")
    scale = _scaling(cfg, where, rank)
    return LoRAModuleWeights(layer, target, a.to(dtype).contiguous(), (b.to(torch.float32) * scale).to(dtype).contiguous())


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's get_pattern_key: a pattern key matches a module name by its dotted suffix (regex allowed)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _scaling(cfg: dict, module: str, rank: int) -> float:
    """lora_alpha / r (rslora: / sqrt(r)); per-module alpha from alpha_pattern, r from the tensor's own rank
    (which is rank_pattern's value where one matches)."""
    alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", cfg["r"])))
    return alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


def shapes_from_hf_config(config: object) -> BaseShapes:
    """BaseShapes from a transformers-style config (hidden_size, heads, head_dim, intermediate_size): lets a
    server check an adapter against the base model without holding the model."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inter = config.intermediate_size
    q, kv = heads * head_dim, kv_heads * head_dim
    targets = {"q_proj": TargetShape(hidden, q), "k_proj": TargetShape(hidden, kv), "v_proj": TargetShape(hidden, kv),
               "o_proj": TargetShape(q, hidden), "gate_proj": TargetShape(hidden, inter),
               "up_proj": TargetShape(hidden, inter), "down_proj": TargetShape(inter, hidden)}
    return BaseShapes(config.num_hidden_layers, targets)
