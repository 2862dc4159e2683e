"""`tokenmill.LLM`: the offline facade with vLLM's shapes. Imports the model runner (torch) lazily."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tokenmill.config import EngineConfig
from tokenmill.engine.args import engine_config, normalize_prompt
from tokenmill.engine.core import EngineCore
from tokenmill.engine.output_processor import RequestState
from tokenmill.engine.outputs import (
    EmbeddingOutput,
    EmbeddingRequestOutput,
    RequestOutput,
)
from tokenmill.engine.request import EngineCoreRequest
from tokenmill.lora.request import LoRARequest
from tokenmill.sampling_params import SamplingParams
from tokenmill.tools.prompt import with_tools


class LLM:
    """LLM(model=None, **engine_args): model is a HF folder, a .gguf file, a HF-cache name, or None (default).

    engine_args use vLLM's names (max_model_len, block_size, kv_cache_memory, max_num_seqs,
    max_num_batched_tokens, enable_chunked_prefill, enable_prefix_caching, dtype, device, seed,
    num_gpu_blocks_override, task, tokenizer, scheduling_policy; LoRA: enable_lora, max_loras, max_lora_rank,
    max_cpu_loras, then generate(..., lora_request=LoRARequest(name, id, path))).
    """

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None, **engine_args: Any) -> None:
        from tokenmill.executor.model_runner import ModelRunner

        self.config = config or engine_config(model, **engine_args)
        self.runner = ModelRunner(self.config)
        self.loaded = self.runner.loaded
        self.engine = EngineCore(self.config, self.runner) if self.loaded.task == "generate" else None
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.loaded.tokenizer

    def generate(self, prompts: Any, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: list[int] | None = None,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None, **_: Any) -> list[RequestOutput]:
        """Run all prompts to completion; outputs in prompt order. use_tqdm is accepted (no progress bar).
        lora_request: one adapter for all prompts or one per prompt (None: the base model); LLM(enable_lora=True)."""
        if self.engine is None:
            raise ValueError(f"invalid task: this model serves task={self.loaded.task!r}; use embed()")
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, Sequence) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"invalid sampling_params: {len(params)} given for {len(prompts)} prompts; pass one or one per prompt")
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"invalid priority: {len(priority)} values for {len(prompts)} prompts")
        loras = self._lora_requests(lora_request, len(prompts))
        tok = self.loaded.tokenizer
        eos = list(self.loaded.eos_token_ids)
        states: dict[str, RequestState] = {}
        order = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                p.validate()
                text, ids = normalize_prompt(prompt, tok)
                rid = str(next(self._ids))
                lora = loras[i].to_wire() if loras[i] is not None else None
                self.engine.add_request(EngineCoreRequest(rid, ids, p, priority=priority[i] if priority else 0,
                                                          eos_token_ids=eos, lora_request=lora))
                states[rid] = RequestState(rid, text, ids, p, tok)
                order.append(rid)
            while self.engine.has_unfinished():
                aborts = []
                for d in self.engine.step():
                    st = states.get(d.request_id)
                    if st is None:
                        continue
                    _, abort = st.process(d)
                    if abort:
                        aborts.append(abort)
                if aborts:
                    self.engine.abort(aborts)
        except BaseException:
            self.engine.abort(list(states))  # leave no request (and no block) behind
            raise
        return [states[rid].final_output() for rid in order]

    def _lora_requests(self, lora_request: Any, n: int) -> list[LoRARequest | None]:
        """One LoRARequest (or None) per prompt, each adapter validated and loaded before any request is queued
        (a malformed adapter raises LoRAAdapterError here, not mid-step)."""
        if lora_request is None:
            return [None] * n
        loras = [lora_request] * n if isinstance(lora_request, LoRARequest) else list(lora_request)
        if len(loras) != n:
            raise ValueError(f"invalid lora_request: {len(loras)} given for {n} prompts; pass one or one per prompt")
        if any(r is not None for r in loras) and self.runner.lora is None:
            raise ValueError("invalid lora_request: LoRA is not enabled; create the LLM with enable_lora=True")
        for r in loras:
            if r is not None and not isinstance(r, LoRARequest):
                raise ValueError(f"invalid lora_request: {r!r} is not a LoRARequest(lora_name, lora_int_id, lora_path)")
        by_id: dict[int, LoRARequest] = {}
        for r in loras:
            if r is not None and by_id.setdefault(r.lora_int_id, r) != r:
                raise ValueError(f"invalid lora_request: lora_int_id={r.lora_int_id} names two adapters "
                                 f"({by_id[r.lora_int_id].lora_name!r}, {r.lora_name!r}); ids must be unique per adapter")
        for r in by_id.values():
            self.runner.lora.add(r)
        return loras

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None,
             chat_template: str | None = None, chat_template_kwargs: dict[str, Any] | None = None,
             lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None, **_: Any) -> list[RequestOutput]:
        """Apply the chat template (`chat_template`, else the model's) to one conversation or a list of them,
        then generate. `tools` (OpenAI function definitions) are rendered as vLLM's LLM.chat does; a template
        that cannot show them is swapped or fed plain turns (tokenmill/tools/prompt.py). Calls are not parsed:
        use tokenmill.tools.get_tool_parser(name).extract(text) on the output."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.loaded.tokenizer
        base = chat_template or self.loaded.chat_template
        if not base:
            raise ValueError("invalid chat_template: this model has no chat template; pass chat_template=...")
        prompts = []
        for conv in convs:
            conv, conv_tools, template = with_tools(list(conv), tools, base)
            kwargs = {**(chat_template_kwargs or {}), **({"tools": conv_tools} if conv_tools else {})}
            ids = tok.apply_chat_template(conv, chat_template=template, add_generation_prompt=add_generation_prompt,
                                          tokenize=True, **kwargs)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            prompts.append({"prompt_token_ids": list(ids)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)

    def embed(self, prompts: Any, use_tqdm: bool = True, **_: Any) -> list[EmbeddingRequestOutput]:
        """Sentence embeddings (task="embed" models), vLLM-shaped: `outputs[i].outputs.embedding`."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        ids = [normalize_prompt(p, self.loaded.tokenizer)[1] for p in prompts]
        vectors = self.runner.embed(ids)
        return [EmbeddingRequestOutput(str(next(self._ids)), prompt_ids, EmbeddingOutput(vec))
                for prompt_ids, vec in zip(ids, vectors)]

    def all_blocks_free(self) -> bool:
        return self.engine is None or self.engine.all_blocks_free()
