"""LoRARequest: which adapter a request runs through (vLLM's `vllm.lora.request.LoRARequest`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class LoRARequest:
    """lora_int_id: a positive id, unique per adapter (0 is the base model); lora_path: a PEFT folder
    (adapter_config.json + adapter_model.safetensors)."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"invalid lora_int_id={self.lora_int_id!r}: must be an integer >= 1 (0 is the base model)")
        if not self.lora_name:
            raise ValueError("invalid lora_name: must be a non-empty string")

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, d: dict[str, Any] | None) -> LoRARequest | None:
        return None if d is None else cls(str(d["lora_name"]), int(d["lora_int_id"]), str(d["lora_path"]))
