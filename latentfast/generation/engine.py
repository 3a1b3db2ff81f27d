"""The decode engine: one loop for every rollout and evaluation.

Prefill runs eagerly into a static KV cache sized ``cache_len(P + C)``. Every later step
has the same shapes: a B x 1 input embedding, a preallocated B x L attention mask and
B x 1 position ids updated in place, outputs written into preallocated B x C buffers at
a step-index tensor. So the one-token step (decoder -> lm_head -> policy) can be
compiled once (Inductor on CPU, CUDA graphs with ``mode="reduce-overhead"`` on GPU) and
reused for prompts of any length within a cache bucket. A *policy* (``policies.py``)
turns the last hidden state into the next input embedding and records what it needs.

A compiled step also keeps its buffers between calls: every mutated tensor (static KV
cache, mask, positions, the policy's outputs) is taken from a small per-model pool keyed
by the shapes, so the next rollout of the same shapes replays the same addresses (CUDA
graphs record pointers; HF's compiled ``generate`` reuses its static cache the same way)
instead of re-recording. Results are copied out of the pool by ``policy.finish``.

Finished rows keep decoding padding, so the batch keeps its shape. The host looks at the
device only every ``check_every`` steps (all rows done?); under torch.distributed every
rank keeps stepping until all ranks are done, so sharded forwards stay collective.
"""
from __future__ import annotations

import logging
import os
import weakref
from collections import OrderedDict

import torch
from torch import nn

from latentfast.hf import adapter

from .cache import cache_len, mark_static, static_cache, takes_cache_position
from .sampling import draw_noise

log = logging.getLogger("latentfast.generation")


class DecoderParts:
    """The pieces of a causal LM the engine drives: the decoder stack (takes
    ``inputs_embeds``), the input embedding and the output head. Accepts a plain HF causal
    LM, a PEFT model around one, ``HybridThinkingLM`` and ``CODIModel``."""

    def __init__(self, model: nn.Module):
        hf = model
        for attr in ("hf_model", "lm"):  # our wrappers (HybridThinkingLM / CODIModel)
            inner = getattr(type(model), attr, None)
            if isinstance(inner, property):
                hf = getattr(model, attr)
                break
        hf = adapter.unwrap(hf)  # PEFT: LoRA layers are injected in place
        if not (hasattr(hf, "get_input_embeddings") and hasattr(hf, "get_output_embeddings")):
            raise TypeError(f"model must be a Hugging Face causal LM (or a latentfast wrapper of one), got "
                            f"{type(model).__name__}")
        self.model, self.hf = model, hf
        self.decoder = adapter.decoder(hf)
        self.embedding = hf.get_input_embeddings()
        self.head = hf.get_output_embeddings()
        if self.head is None:
            raise TypeError(f"{type(hf).__name__} has no output embeddings (lm_head)")
        self.config = hf.config
        self.cache_kw = adapter.cache_kwarg(self.decoder)
        self.cache_position = takes_cache_position(self.decoder)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h).float()


def _sharded(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        FSDPModule = ()
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()
    return any(isinstance(m, FSDPModule) for m in module.modules()) or any(
        isinstance(p, DTensor) for p in module.parameters())


def want_compile(compile: bool | None, parts: DecoderParts, device: torch.device) -> bool:
    """``compile=None``: the ``LATENTFAST_COMPILE`` environment variable (0/1) if set, else
    on CUDA only (on CPU, Inductor's step measured no faster than eager for small models,
    ``bench/bench_generation.py``, and compiling costs tens of seconds). FSDP-sharded
    models always decode eagerly (their hooks run per module)."""
    if compile is None:
        env = os.environ.get("LATENTFAST_COMPILE")
        compile = env != "0" if env is not None else device.type == "cuda"
    if compile and _sharded(parts.decoder):
        log.info("latentfast.generation: FSDP-sharded model, decoding eagerly")
        return False
    return bool(compile)


def _step(eng: "Engine", e: torch.Tensor, alive: torch.Tensor):
    """One decoding step, fixed shapes: feed ``e`` (B x D) at column ``col``, then let the
    policy pick the next input from the new last hidden state."""
    eng.attn.index_copy_(1, eng.col, alive[:, None].to(eng.attn.dtype))
    h = eng.forward(e[:, None], eng.attn, eng.pos, eng.col)
    eng.pos.add_(1)
    eng.col.add_(1)
    eng.t.add_(1)
    return eng.policy.head(eng, h)


class _CompiledStep:
    """``torch.compile`` of ``_step`` (one per mode), with an automatic eager fallback the
    first time a model or setting cannot be compiled (logged once)."""

    _compiled: dict = {}
    _failed: set = set()

    @classmethod
    def get(cls, device: torch.device):
        mode = "reduce-overhead" if device.type == "cuda" else None
        if mode not in cls._compiled:
            cls._compiled[mode] = torch.compile(_step, mode=mode, fullgraph=True, dynamic=False)
        return cls._compiled[mode], mode

    @classmethod
    def run(cls, eng, e, alive):
        fn, mode = cls.get(eng.device)
        if eng.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        if eng.compile_checked:
            return fn(eng, e, alive)
        try:  # a failed compile raises before anything runs, so the state is untouched
            out = fn(eng, e, alive)
        except Exception as exc:  # noqa: BLE001 -- any compile failure: decode eagerly
            key = (type(eng.parts.hf).__name__, type(eng.policy).__name__, type(exc).__name__)
            if key not in cls._failed:
                cls._failed.add(key)
                log.warning("latentfast.generation: compiling the decode step failed for %s with %s (%s: %s); "
                            "decoding eagerly", key[0], key[1], key[2], str(exc).split("\n")[0][:200])
            eng.compiled = False
            return _step(eng, e, alive)
        eng.compile_checked = True
        return out


class BufferPool:
    """Work buffers of compiled decodes, per model (weakly keyed by the decoder module): the
    sets of the last ``keep`` shape keys, least recently used dropped first."""

    keep = 4
    _pools: "weakref.WeakKeyDictionary[nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()

    @classmethod
    def get(cls, decoder: nn.Module, key: tuple) -> dict:
        sets = cls._pools.setdefault(decoder, OrderedDict())
        bufs = sets.pop(key, None) or {}
        sets[key] = bufs
        while len(sets) > cls.keep:
            sets.popitem(last=False)
        return bufs


class Engine:
    """Buffers of one ``decode`` call (B rows, P prompt tokens, C new tokens)."""

    def __init__(self, parts: DecoderParts, policy, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 max_new_tokens: int, compiled: bool):
        self.parts, self.policy = parts, policy
        self.B, self.P = input_ids.shape
        self.C = max_new_tokens
        self.L = cache_len(self.P + self.C, bucketed=compiled)
        self.device = input_ids.device
        self.dtype = parts.embedding.weight.dtype
        self.compiled, self.compile_checked = compiled, False
        self.pool = (BufferPool.get(parts.decoder, (self.B, self.L, self.C, self.dtype, self.device))
                     if compiled else None)
        self.cache = self._static_cache()
        self.attn = self.buffer("attn", (self.B, self.L), torch.long, 0)
        self.attn[:, :self.P] = attention_mask
        self.prompt_pos = adapter.positions_from_mask(attention_mask)
        self.pos = self.buffer("pos", (self.B, 1), torch.long, self.prompt_pos[:, -1:] + 1)  # next fed token's position
        self.col = self.buffer("col", (1,), torch.long, self.P)  # its cache slot
        self.t = self.buffer("t", (1,), torch.long, 0)           # step index of the policy's head
        self.noise = None
        if policy.samples:
            self.noise = self.buffer("noise", (self.B, parts.config.vocab_size), torch.float32, 0)
        policy.setup(self)
        if compiled and self.device.type == "cuda":
            mark_static(self.attn, self.pos, self.col, self.t, *([self.noise] if self.noise is not None else []),
                        *policy.buffers())

    def buffer(self, name: str, shape, dtype: torch.dtype, fill=0) -> torch.Tensor:
        """A work buffer filled with ``fill`` (a number or a tensor to copy): from the pool
        when the step is compiled (the same storage on every call of these shapes), else new.
        Policies allocate everything ``head`` writes through this."""
        shape = torch.Size(shape)
        t = None if self.pool is None else self.pool.get(name)
        if t is None or t.shape != shape or t.dtype != dtype:
            t = torch.empty(shape, dtype=dtype, device=self.device)
            if self.pool is not None:
                self.pool[name] = t
        return t.copy_(fill) if isinstance(fill, torch.Tensor) else t.fill_(fill)

    def _static_cache(self):
        cache = None if self.pool is None else self.pool.get("cache")
        if cache is None:
            cache = static_cache(self.parts.config, self.B, self.L, self.device, self.dtype)
            if self.pool is not None:
                self.pool["cache"] = cache
        else:
            cache.reset()  # stale keys would be masked anyway; zeros keep a reused cache identical to a new one
        return cache

    def forward(self, embeds, attn, pos, col):
        p = self.parts
        kw = {p.cache_kw: self.cache}
        if p.cache_position:
            kw["cache_position"] = col
        if not torch.is_autocast_enabled():
            embeds = embeds.to(self.dtype)
        out = p.decoder(inputs_embeds=embeds, attention_mask=attn, position_ids=pos, use_cache=True, **kw)
        return out.last_hidden_state[:, -1]

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.policy.prompt_embeds(self, input_ids)
        p = self.parts
        kw = {p.cache_kw: self.cache}
        if p.cache_position:
            kw["cache_position"] = torch.arange(self.P, device=self.device)
        out = p.decoder(inputs_embeds=embeds, attention_mask=self.attn, position_ids=self.prompt_pos,
                        use_cache=True, **kw)
        return out.last_hidden_state[:, -1]


@torch.no_grad()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, policy, *,
           generator=None, sync_ranks: bool = True, check_every: int = 8, compile: bool | None = None,
           max_steps: int | None = None):
    """Run ``policy`` for up to ``max_steps`` heads (default ``max_new_tokens``); returns
    ``policy.finish(engine, steps)``. See the module docstring."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    if input_ids.dim() != 2 or attention_mask is None or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be B x P, got {tuple(input_ids.shape)} and "
                         f"{None if attention_mask is None else tuple(attention_mask.shape)}")
    parts = DecoderParts(model)
    steps_total = max_steps or max_new_tokens
    compiled = want_compile(compile, parts, input_ids.device)
    eng = Engine(parts, policy, input_ids, attention_mask, steps_total, compiled)
    collective = (sync_ranks and torch.distributed.is_available() and torch.distributed.is_initialized()
                  and torch.distributed.get_world_size() > 1)

    h = eng.prefill(input_ids)
    if eng.noise is not None:
        draw_noise(eng.noise, generator)
    e, alive = policy.head(eng, h)
    steps = 1
    while steps < steps_total:
        if steps % check_every == 0:  # the loop's only host synchronisation
            done = policy.all_done(eng).to(torch.int32)
            if collective:  # stop only once every rank is done
                torch.distributed.all_reduce(done, op=torch.distributed.ReduceOp.MIN)
            if bool(done):
                break
        if eng.noise is not None:
            draw_noise(eng.noise, generator)
        e, alive = _CompiledStep.run(eng, e, alive) if eng.compiled else _step(eng, e, alive)
        steps += 1
    return policy.finish(eng, steps)
