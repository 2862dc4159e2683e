"""LoRA adapters over HTTP, as vLLM serves them: a request's `model` names an adapter (or the base model),
/v1/models lists each adapter with `parent` = the base, and POST /v1/load_lora_adapter /
/v1/unload_lora_adapter change the set at run time (only with --allow-runtime-lora-updating, or env
TOKENMILL_ALLOW_RUNTIME_LORA_UPDATING=True: otherwise they answer 404 as vLLM's absent routes do).

The registry here is the truth about which names are served; the engine core holds adapter weights (in
memory, at most max_cpu_loras) and reloads an evicted one from its path on next use, so a restarted core
serves the same adapters without being told again.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from tokenmill.config import LoRAConfig
from tokenmill.engine.errors import EngineDeadError
from tokenmill.lora.request import LoRARequest
from tokenmill.server.errors import APIError, engine_dead, invalid_param
from tokenmill.server.serving_engine import check_ready, read_body
from tokenmill.server.state import ServerState

log = logging.getLogger("tokenmill.server")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is a 400 naming it, not silently ignored


class LoadLoRAAdapterRequest(_Body):
    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoRAAdapterRequest(_Body):
    lora_name: str = Field(min_length=1, max_length=256)
    lora_int_id: int | None = None  # vLLM's field; the name decides here


@dataclass(slots=True)
class LoRARegistry:
    """Served adapter names -> LoRARequest. Invariants: names are unique and never the base model's name;
    lora_int_ids are assigned once, increasing, and never reused (so prefix-cache blocks of an unloaded
    adapter can never be hit by a later one loaded under a reused id)."""

    base_name: str
    adapters: dict[str, LoRARequest] = field(default_factory=dict)
    next_id: int = 1

    @classmethod
    def from_config(cls, base_name: str, config: LoRAConfig | None) -> LoRARegistry | None:
        if config is None:
            return None
        reg = cls(base_name)
        for name, path in config.lora_modules:
            if name == base_name:
                raise ValueError(f"invalid lora_modules: the adapter name {name!r} is the base model's name")
            reg.add(name, path)
        return reg

    def check_new(self, name: str) -> None:
        if name == self.base_name:
            raise invalid_param("lora_name", f"invalid lora_name={name!r}: it is the base model's name; "
                                "give the adapter a name of its own")
        if name in self.adapters:
            raise invalid_param("lora_name", f"The lora adapter '{name}' has already been loaded; unload it "
                                "first (POST /v1/unload_lora_adapter) or choose another lora_name.")

    def add(self, name: str, path: str) -> LoRARequest:
        req = LoRARequest(name, self.next_id, path)
        self.adapters[name] = req
        self.next_id += 1
        return req

    def peek(self, name: str, path: str) -> LoRARequest:
        """The LoRARequest `add(name, path)` would register, for validating it first."""
        return LoRARequest(name, self.next_id, path)


def lora_for(state: ServerState, model: str) -> LoRARequest | None:
    """The adapter a request's (already checked) served name selects; None for the base model."""
    return state.loras.adapters.get(model) if state.loras is not None else None


def adapter_cards(state: ServerState, created: int, max_model_len: int | None) -> list[dict[str, Any]]:
    """/v1/models entries of the adapters: `root` the adapter's path, `parent` the base model (vLLM's)."""
    if state.loras is None:
        return []
    return [{"id": name, "object": "model", "created": created, "owned_by": "tokenmill", "root": req.lora_path,
             "parent": state.model_name, "max_model_len": max_model_len}
            for name, req in state.loras.adapters.items()]


def lora_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/load_lora_adapter", openapi_extra=_doc(LoadLoRAAdapterRequest))
    async def load_adapter(request: Request) -> Response:
        body = await read_body(request, LoadLoRAAdapterRequest, state.server_config.max_body_bytes,
                               state.server_config.max_json_depth)
        reg = _runtime_registry(state)
        reg.check_new(body.lora_name)
        check_ready(state)
        async with _lock(state):  # one load at a time: the id peeked above is the one registered below
            reg.check_new(body.lora_name)
            lora = reg.peek(body.lora_name, body.lora_path)
            await _validate(state, lora)
            reg.add(lora.lora_name, lora.lora_path)
        log.info("loaded LoRA adapter %s (id %d) from %s", lora.lora_name, lora.lora_int_id, lora.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{lora.lora_name}' added successfully.")

    @router.post("/v1/unload_lora_adapter", openapi_extra=_doc(UnloadLoRAAdapterRequest))
    async def unload_adapter(request: Request) -> Response:
        body = await read_body(request, UnloadLoRAAdapterRequest, state.server_config.max_body_bytes,
                               state.server_config.max_json_depth)
        reg = _runtime_registry(state)
        lora = reg.adapters.pop(body.lora_name, None)
        if lora is None:
            raise APIError(404, f"The lora adapter '{body.lora_name}' cannot be found; loaded adapters: "
                           f"{', '.join(reg.adapters) or 'none'}.", param="lora_name", code="not_found")
        if state.engine is not None and not state.engine.errored:
            try:  # frees its memory in the core; a core that never loaded it has nothing to free
                await state.engine.remove_lora(lora.lora_name)
            except (ValueError, EngineDeadError):
                pass
        log.info("unloaded LoRA adapter %s (id %d)", lora.lora_name, lora.lora_int_id)
        return PlainTextResponse(f"Success: LoRA adapter '{lora.lora_name}' removed successfully.")

    return router


async def load_static_adapters(state: ServerState) -> bool:
    """Validate the --lora-modules adapters once the engine is up; False (with state.load_error set) when one
    cannot be served, so the server exits as vLLM does rather than fail every request for it later."""
    if state.loras is None:
        return True
    for lora in list(state.loras.adapters.values()):
        try:
            await state.engine.add_lora(lora)
        except ValueError as exc:
            state.load_error = f"--lora-modules {lora.lora_name}={lora.lora_path}: {exc}"
            log.error("cannot serve LoRA adapter: %s", state.load_error)
            return False
    return True


def _doc(body: type[BaseModel]) -> dict[str, Any]:
    """The request body for /openapi.json (the handlers read raw bodies, which FastAPI cannot see)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": body.model_json_schema()}}}}


def _runtime_registry(state: ServerState) -> LoRARegistry:
    if not state.server_config.allow_runtime_lora_updating:
        raise APIError(404, "Loading and unloading LoRA adapters at run time is disabled on this server; start it "
                       "with --allow-runtime-lora-updating (or TOKENMILL_ALLOW_RUNTIME_LORA_UPDATING=True).",
                       code="not_found")
    if state.loras is None:
        raise APIError(400, "LoRA is not enabled on this server; start it with --enable-lora.",
                       param="lora_name", code="lora_not_enabled")
    return state.loras


async def _validate(state: ServerState, lora: LoRARequest) -> None:
    """The core parses the adapter against the model now: 400 naming the file and the problem."""
    try:
        await state.engine.add_lora(lora)
    except ValueError as exc:
        raise invalid_param("lora_path", f"invalid lora_path={lora.lora_path!r}: {exc}") from None
    except EngineDeadError as exc:
        raise engine_dead(str(exc)) from exc


def _lock(state: ServerState) -> asyncio.Lock:
    lock = state.extra.get("lora_lock")
    if lock is None:
        lock = state.extra["lora_lock"] = asyncio.Lock()
    return lock
