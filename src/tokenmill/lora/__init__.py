"""Multi-LoRA serving: PEFT adapters on one base model, mixed in one batch. No torch at import time here:
the engine and server import `tokenmill.lora.request` only."""
