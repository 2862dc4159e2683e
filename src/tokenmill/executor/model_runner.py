"""ModelRunner: owns the model, the paged KV tensors and per-sequence sampler state.

execute(SchedulerOutput) flattens the step (prefill chunks and decodes, no padding) into input_ids,
positions and per-KV-group attention metadata, runs one forward, computes logits only at positions that
sample, samples, and returns ModelOutput after exactly one host sync (in the sampler).
"""

from __future__ import annotations

import logging

import torch

from tokenmill.config import EngineConfig
from tokenmill.cpu_affinity import apply_placement
from tokenmill.engine.outputs import (
    KVCacheGroupSpec,
    ModelOutput,
    PromptLogprobs,
    SampledToken,
    ScheduledSeq,
    SchedulerOutput,
)
from tokenmill.executor.kv_cache import resolve_kv_cache_dtype, zeros
from tokenmill.executor.kv_sizing import (
    KVGroupSize,
    cpu_auto_limit_bytes,
    plan_kv_cache,
)
from tokenmill.executor.precision import describe_precision, precision_info
from tokenmill.executor.prompt_logprobs import compute_prompt_logprobs
from tokenmill.kernels.cpu_kernels import load_cpu_kernels
from tokenmill.kernels.metadata import AttentionMetadata
from tokenmill.layers.attention import ForwardContext
from tokenmill.layers.decode_step import attach_fused_decode
from tokenmill.layers.linear import prepare_linears_for_cpu
from tokenmill.layers.sampler import Sampler, SeqSamplingState, needs_penalties
from tokenmill.lora.manager import LoRAManager
from tokenmill.model.loader import LoadedModel, load_model
from tokenmill.spec_decode.proposer import ProposalInput, build_proposer
from tokenmill.spec_decode.verify import accept, row_states

log = logging.getLogger("tokenmill.executor")


class ModelRunner:
    """Invariant: kv_caches[layer] has shape [num_blocks[group], block_size, num_kv_heads, head_dim] and
    block 0 of every group is the null block (never allocated by the engine; safe to read, masked out)."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None, attn_backend: str = "fast"):
        self.cpu_placement = apply_placement(config.num_threads, config.cpu_cores)  # before any torch work
        self.config = config
        self.loaded = loaded if loaded is not None else load_model(config.model)
        self.model = self.loaded.model
        self.device = self.loaded.device
        self.dtype = self.loaded.dtype
        self.block_size = config.cache.block_size
        self.attn_backend = attn_backend
        self.kv_dtype = resolve_kv_cache_dtype(config.cache.kv_cache_dtype, self.dtype)
        self.cpu_kernels = None
        if attn_backend == "fast" and self.device.type == "cpu" and self.dtype in (torch.float32, torch.bfloat16):
            self.cpu_kernels = load_cpu_kernels()  # None (PyTorch paths) when no compiler is available
        if self.device.type == "cpu":
            prepare_linears_for_cpu(self.model, self.cpu_kernels, final=True)
        # After the CPU layouts: LoRA wraps each projection's prepared forward (tokenmill/lora/).
        self.lora = LoRAManager(self.model, config.lora, self.device) if config.lora is not None else None
        if self.cpu_kernels is not None:
            for module in self.model.modules():  # norms and gated activations with a native fast path
                if hasattr(module, "use_cpu_kernels"):
                    module.use_cpu_kernels(self.cpu_kernels)
            if self.lora is None:  # (LoRA wraps the projections: those steps run layer by layer)
                attach_fused_decode(self.model, self.cpu_kernels)
        log.info("%s", describe_precision(self.precision_info()))
        self.sampler = Sampler(self.loaded.vocab_size, self.device, self.cpu_kernels)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(config.model.seed)
        self.states: dict[str, SeqSamplingState] = {}
        self.proposer = build_proposer(config, self.loaded) if config.speculative is not None else None
        self._logits: torch.Tensor | None = None  # reused every step: see _logits_buffer
        self.kv_cache_groups: list[KVCacheGroupSpec] = []
        self.num_blocks: list[int] = []
        self.kv_cache_bytes = 0
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.layer_to_group: list[int] = []
        if self.loaded.task == "generate":
            self._allocate_kv_cache()

    def precision_info(self) -> dict[str, str | None]:
        """dtype, why, KV cache dtype, device / CPU and kernel variant: logged at start, shown by /version."""
        return precision_info(self.loaded, self.kv_dtype, self.cpu_kernels)

    # ---- KV cache -------------------------------------------------------------------------------------
    def _allocate_kv_cache(self) -> None:
        self.kv_cache_groups = self.model.kv_cache_groups()
        shapes = self.model.kv_layer_shapes()
        bs, elsize = self.block_size, torch.empty((), dtype=self.kv_dtype).element_size()
        if bs < 1:
            raise ValueError(f"invalid block_size={bs}: must be >= 1")
        override = self.config.cache.num_gpu_blocks_override
        if override is not None:
            if override < 2:
                raise ValueError(f"invalid num_gpu_blocks_override={override}: must be >= 2 (block 0 is reserved)")
            self.num_blocks = [override] * len(self.kv_cache_groups)
        else:
            self.num_blocks = self._plan_kv_cache(shapes, elsize)
        self.layer_to_group = [0] * len(shapes)
        for gi, g in enumerate(self.kv_cache_groups):
            for l in g.layer_ids:
                self.layer_to_group[l] = gi
        self.kv_caches = []
        for l, (heads, dim) in enumerate(shapes):
            shape = (self.num_blocks[self.layer_to_group[l]], bs, heads, dim)
            self.kv_caches.append((zeros(shape, self.kv_dtype, self.device), zeros(shape, self.kv_dtype, self.device)))

    def _plan_kv_cache(self, shapes: list[tuple[int, int]], elsize: int) -> list[int]:
        """Block counts from executor/kv_sizing.py; lowers loaded.max_model_len (logged) when the model's own
        limit does not fit the cache."""
        sizes = [KVGroupSize(g.sliding_window, sum(2 * shapes[l][0] * shapes[l][1] * elsize for l in g.layer_ids))
                 for g in self.kv_cache_groups]
        sched = self.config.scheduler
        plan = plan_kv_cache(
            sizes, block_size=self.block_size, max_model_len=self.loaded.max_model_len,
            max_num_seqs=sched.max_num_seqs, max_num_batched_tokens=sched.max_num_batched_tokens,
            kv_cache_memory_gib=self.config.cache.kv_cache_memory, auto_limit_bytes=self._auto_kv_limit_bytes(),
            max_model_len_given=self.config.model.max_model_len is not None)
        if plan.lowered:
            log.warning("max_model_len lowered from %d (the model's limit) to %d: the KV cache holds %d tokens; "
                        "raise --kv-cache-memory for longer sequences", self.loaded.max_model_len,
                        plan.max_model_len, plan.capacity_tokens)
            self.loaded.max_model_len = plan.max_model_len
        self.kv_cache_bytes = plan.num_bytes
        return plan.num_blocks

    def _auto_kv_limit_bytes(self) -> float:
        """The cap on an auto-sized cache: 80% of free GPU memory, or the CPU limit of kv_sizing."""
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return 0.8 * free
        import psutil

        return cpu_auto_limit_bytes(psutil.virtual_memory().available)

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the smallest-capacity group can hold (excluding the null block)."""
        return min(self.num_blocks, default=1) * self.block_size - self.block_size

    def _logits_buffer(self, rows: int) -> torch.Tensor | None:
        """A [rows, V] float32 buffer the LM head may write the step's logits into (CPU only; on CUDA the caching
        allocator already reuses memory). A fresh [64, 262144] tensor per step costs ~20-30 ms of page faults
        on CPU, since glibc maps allocations this large anew each time. The logits die within the step."""
        if self.device.type != "cpu":
            return None
        vocab = self.model.config.vocab_size
        if self._logits is None or self._logits.numel() < rows * vocab:
            self._logits = torch.empty(rows * vocab, dtype=torch.float32)
        return self._logits[: rows * vocab].view(rows, vocab)

    # ---- per-sequence state ---------------------------------------------------------------------------
    def _update_states(self, so: SchedulerOutput) -> None:
        for seq_id in so.finished_seq_ids:
            self._drop_state(seq_id)
        for seq in so.seqs:
            if seq.setup is not None:
                self._drop_state(seq.seq_id)  # re-sent after preemption: its penalty row is rebuilt
                s = seq.setup
                gen = None
                if s.seed is not None:
                    gen = torch.Generator(device=self.device)
                self.states[seq.seq_id] = SeqSamplingState(
                    params=s.params, prompt_token_ids=list(s.prompt_token_ids),
                    output_token_ids=list(s.output_token_ids), eos_token_ids=list(s.eos_token_ids),
                    generator=gen, seed=s.seed,
                )
            elif seq.seq_id not in self.states:
                raise KeyError(f"seq {seq.seq_id!r} scheduled without setup and unknown to the runner")

    def _drop_state(self, seq_id: str) -> None:
        state = self.states.pop(seq_id, None)
        if state is not None:
            self.sampler.release(state)
        if self.proposer is not None:
            self.proposer.release(seq_id)

    # ---- step -----------------------------------------------------------------------------------------
    def execute(self, so: SchedulerOutput) -> ModelOutput:
        self._update_states(so)
        if not so.seqs:
            return ModelOutput(sampled=[])
        with torch.inference_mode():
            input_ids, positions, ctx, sample_idx = self._prepare(so.seqs)
            if self.lora is not None:
                self.lora.set_batch(so.seqs)  # each token's adapter slot, read by the wrapped layers
            hidden = self.model(input_ids, positions, ctx)
            prompt_lps = self._prompt_logprobs(hidden, so.seqs)
            sampling = [s for s in so.seqs if s.sample]
            if not sampling:
                return ModelOutput(sampled=[], prompt_logprobs=prompt_lps)
            logits = self.model.compute_logits(hidden.index_select(0, sample_idx), self._logits_buffer(len(sample_idx)))
            states = row_states(sampling, [self.states[s.seq_id] for s in sampling])
            for st in states:
                if st.generator is not None:
                    # Seed per output index: a preempted, re-sent sequence continues exactly where it stopped.
                    st.generator.manual_seed((st.seed * 1_000_003 + len(st.output_token_ids)) % (1 << 63))
            rows = self.sampler(logits, states, self.generator, so.grammar_bitmask)
        out = []
        for seq, emitted in zip(sampling, accept(sampling, rows)):
            st = self.states[seq.seq_id]
            for row in emitted:
                st.output_token_ids.append(row.token_id)
                out.append(SampledToken(seq.seq_id, row.token_id, row.logprob, row.top_logprobs, rank=row.rank))
        drafts = self._propose(sampling) if self.proposer is not None else {}
        return ModelOutput(sampled=out, prompt_logprobs=prompt_lps, draft_token_ids=drafts)

    def _propose(self, sampling: list[ScheduledSeq]) -> dict[str, list[int]]:
        """Drafts for the next step, unless this step decodes more sequences than speculation pays for.
        Sequences with penalties get none (their counts would need one row per draft position)."""
        spec = self.config.speculative
        if spec.disable_by_batch_size is not None and len(sampling) > spec.disable_by_batch_size:
            return {}
        batch = []
        for seq in sampling:
            st = self.states[seq.seq_id]
            if not needs_penalties(st.params):
                batch.append(ProposalInput(seq.seq_id, st.prompt_token_ids + st.output_token_ids,
                                           spec.num_speculative_tokens))
        return self.proposer.propose(batch) if batch else {}

    def _prompt_logprobs(self, hidden: torch.Tensor, seqs: list[ScheduledSeq]) -> list[PromptLogprobs]:
        """Only chunks that ask for them pay for logits at every prompt position."""
        wanted = {s.seq_id: self.states[s.seq_id].prompt_token_ids for s in seqs if s.prompt_logprobs is not None}
        return compute_prompt_logprobs(self.model, hidden, seqs, wanted) if wanted else []

    def _prepare(self, seqs: list[ScheduledSeq]):
        ids: list[int] = []
        pos: list[int] = []
        sample_idx: list[int] = []
        query_lens: list[int] = []
        start_pos: list[int] = []
        for s in seqs:
            n = len(s.token_ids)
            if n == 0:
                raise ValueError(f"seq {s.seq_id!r} scheduled with no tokens")
            if s.start_pos + n > self.loaded.max_model_len:
                raise ValueError(f"seq {s.seq_id!r} exceeds max_model_len={self.loaded.max_model_len}")
            ids.extend(s.token_ids)
            pos.extend(range(s.start_pos, s.start_pos + n))
            if s.sample:  # the last position, and one more per draft token to verify
                sample_idx.extend(range(len(ids) - 1 - s.num_draft_tokens, len(ids)))
            query_lens.append(n)
            start_pos.append(s.start_pos)
        metadata = [
            AttentionMetadata.build(query_lens, start_pos, [s.block_ids[gi] for s in seqs], self.block_size,
                                    g.sliding_window, self.device)
            for gi, g in enumerate(self.kv_cache_groups)
        ]
        ctx = ForwardContext(metadata, self.layer_to_group, self.kv_caches, self.attn_backend, self.cpu_kernels)
        dev = self.device
        return (torch.tensor(ids, dtype=torch.long, device=dev), torch.tensor(pos, dtype=torch.long, device=dev),
                ctx, torch.tensor(sample_idx, dtype=torch.long, device=dev))

    def embed(self, token_id_lists: list[list[int]]) -> list[list[float]]:
        """Sentence embeddings for task='embed' models (the model implements `embed`)."""
        if not hasattr(self.model, "embed"):
            raise ValueError(f"task: model {self.loaded.arch} does not produce embeddings; use task='generate'")
        with torch.inference_mode():
            return self.model.embed(token_id_lists)
