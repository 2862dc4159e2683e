"""Batch fixtures: a ServerState over an in-process engine on the tiny Llama (no HTTP, no subprocess)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry

from tokenmill.config import ServerConfig
from tokenmill.engine.args import engine_config
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.state import ServerState


def make_state(model_dir, server_config: ServerConfig | None = None, **engine_kw) -> ServerState:
    """A ServerState whose engine is an AsyncLLM with the in-process core client (what run-batch builds)."""
    from tokenmill.engine.async_llm import AsyncLLM
    from tokenmill.engine.inproc_client import InProcessCoreClient
    from tokenmill.executor.model_runner import ModelRunner

    args = {"block_size": 4, "num_gpu_blocks_override": 256, "max_model_len": 256, "served_model_name": "tiny",
            **engine_kw}
    cfg = engine_config(str(model_dir), **args)
    registry = CollectorRegistry()
    state = ServerState(engine_config=cfg, server_config=server_config or ServerConfig(), served_model_names=["tiny"],
                        registry=registry, metrics=ServerMetrics(registry, "tiny"), created=int(time.time()))
    state.engine = AsyncLLM(cfg, client=InProcessCoreClient(cfg, ModelRunner(cfg)))
    return state
