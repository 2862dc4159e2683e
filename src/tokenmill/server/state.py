"""The one mutable object of a server process, stored on `app.state.tokenmill`."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from tokenmill.config import EngineConfig, ServerConfig
from tokenmill.server.metrics import ServerMetrics

if TYPE_CHECKING:
    from tokenmill.server.lora_api import LoRARegistry
    from tokenmill.server.lora_metrics import LoRAMetrics


@dataclass(slots=True)
class ServerState:
    """Invariants: `engine` is None until the core reports ready; after a core death it is the dead engine
    (errored) until the restarted one replaces it (server/core_supervisor.py). `in_flight_seqs` counts
    sequences of requests submitted and not yet finished (each request adds its n). `load_error` is set
    when there is nothing left to serve: the first load failed, or the core-restart budget is spent."""

    engine_config: EngineConfig
    server_config: ServerConfig
    served_model_names: list[str]
    registry: CollectorRegistry
    metrics: ServerMetrics
    engine: Any = None  # tokenmill.engine.async_llm.AsyncLLM once loaded
    chat_template: str | None = None  # --chat-template override (file contents or inline jinja)
    load_error: str | None = None
    draining: bool = False
    in_flight_seqs: int = 0
    core_restarts: int = 0  # engine cores started after the first one died
    batch: Any = None  # tokenmill.batch.worker.BatchWorker: the files / batches store and job loop
    last_num_waiting: int = 0
    created: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    loras: LoRARegistry | None = None  # served LoRA adapters (server/lora_api.py); None: LoRA off
    lora_metrics: LoRAMetrics | None = None
    # tokenization and chat rendering run here, off the event loop (server/tokenizer_pool.py)
    tokenizer_executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="tokenmill-tokenize"))

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]
