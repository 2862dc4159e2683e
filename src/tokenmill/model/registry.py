"""Architecture name (config.json "architectures") -> model class, imported lazily."""

from __future__ import annotations

import importlib

# name -> (module, class). Gemma 3 and BERT live in the GEMMA engineer's modules.
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("tokenmill.model.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("tokenmill.model.llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("tokenmill.model.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("tokenmill.model.qwen2", "Qwen3ForCausalLM"),
    "Gemma3ForCausalLM": ("tokenmill.model.gemma3", "Gemma3ForCausalLM"),
    "BertModel": ("tokenmill.model.bert", "BertModel"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def resolve_architecture(architectures: list[str] | None) -> tuple[str, type]:
    """Return (architecture name, class) for the first supported name; ValueError naming them otherwise."""
    for arch in architectures or []:
        if arch in _MODELS:
            module, cls = _MODELS[arch]
            return arch, getattr(importlib.import_module(module), cls)
    raise ValueError(
        f"unsupported architecture {architectures!r} in config.json 'architectures': "
        f"supported are {', '.join(supported_architectures())}"
    )
