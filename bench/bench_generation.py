"""Decoding: the engine (``latentfast.generation``) vs HF ``generate`` and the old loop.

impls (same model, prompts and number of new tokens; every row decodes all C steps):
  hf_generate        ``model.generate(do_sample=False)`` (DynamicCache), the baseline.
  old_loop           the loop latentfast used before the engine (``reference/generation.py``):
                     DynamicCache, ``torch.cat`` mask, eager.
  engine_eager       static cache + fixed-shape step, eager.
  engine_compiled    the same step through ``torch.compile`` (Inductor on CPU,
                     ``reduce-overhead`` CUDA graphs on GPU); compile time excluded.
  prefill            the engine's prefill alone (decode ms/step = (ms - prefill) / (C - 1)).
  matmuls_alone      the step's GEMMs only (q/k/v/o, gate/up/down per layer, lm_head) x C,
                     the floor the framework overhead is measured against.
Case "greedy" is plain decoding; case "hrpo" samples with HRPO's thinking policy
(old_loop = the reference thinking loop). CPU: the HRPO demo's tiny Qwen2 (hidden 128,
4 layers, vocab 1024), fp32, 1 thread, B=64, 48-token prompts, 32 new tokens.
GPU: a Qwen2.5-0.5B-shaped model, bf16, B=8, 256-token prompts, 512 new tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from measure import compare

from latentfast.data import build_tokenizer
from latentfast.generation import ThinkingPolicy, decode, generate
from latentfast.models import HybridConfig, HybridThinkingLM, build_tiny_causal_lm
from latentfast.reference.generation import hybrid_generate


def _prompts(V, B, P, device, pad):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, min(V, 1000), (B, P), generator=g)
    plen = torch.randint(P // 2, P + 1, (B,), generator=g)
    mask = (torch.arange(P)[None] >= (P - plen)[:, None]).long()
    return ids.masked_fill(mask == 0, pad).to(device), mask.to(device)


def _matmuls(lm, B, C, device, dtype):
    cfg = lm.config
    D, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * hd
    x = torch.randn(B, D, device=device, dtype=dtype)
    shapes = [(D, D), (kv, D), (kv, D), (D, D), (I, D), (I, D)]
    ws = [torch.randn(o, i, device=device, dtype=dtype) for o, i in shapes]
    down = torch.randn(D, I, device=device, dtype=dtype)
    head = lm.get_output_embeddings().weight

    def run():
        for _ in range(C):
            for _ in range(cfg.num_hidden_layers):
                for w in ws:
                    y = F.linear(x, w)
                F.linear(y, down)
            F.linear(x, head)
    return run


def run(device, quick):
    cuda = device.type == "cuda"
    tok = build_tokenizer()
    if cuda:
        size, dtype, B, P, C = "0.5b", torch.bfloat16, 8, 256, 512
    else:
        size, dtype, B, P, C = "tiny", torch.float32, 64, 48, 32
        torch.set_num_threads(1)
    torch.manual_seed(0)
    lm = build_tiny_causal_lm(tok, size=size).to(device, dtype).eval()
    V = lm.config.vocab_size
    ids, mask = _prompts(V, B, P, device, tok.pad_token_id)
    never = [V + 1]  # an EOS id no row emits: every row decodes all C steps
    kw = dict(eos_token_id=never, pad_token_id=tok.pad_token_id)

    def hf():
        with torch.no_grad():
            return lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=C, min_new_tokens=C,
                               do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)

    def prefill():
        return generate(lm, ids, mask, 1, compile=False, **kw)

    impls = {"hf_generate": hf,
             "old_loop": lambda: hybrid_generate(lm, ids, mask, C, **kw),
             "engine_eager": lambda: generate(lm, ids, mask, C, compile=False, **kw),
             "engine_compiled": lambda: generate(lm, ids, mask, C, compile=True, **kw),
             "prefill": prefill,
             "matmuls_alone": _matmuls(lm, B, C, device, dtype)}
    cases = [_case("greedy", impls, device, B, P, C, size, dtype)]

    torch.manual_seed(0)
    m = HybridThinkingLM(lm, HybridConfig()).to(device).eval()
    hk = dict(pad_token_id=tok.pad_token_id, do_sample=True, temperature=1.0)
    marker = [tok.answer_marker_id]

    def engine(compiled):
        g = torch.Generator(device).manual_seed(0)
        return decode(m, ids, mask, C, ThinkingPolicy(marker, never, **hk), generator=g, compile=compiled)

    impls = {"old_loop": lambda: hybrid_generate(m, ids, mask, C, eos_token_id=never, marker_ids=marker,
                                                 generator=torch.Generator(device).manual_seed(0), **hk),
             "engine_eager": lambda: engine(False), "engine_compiled": lambda: engine(True)}
    cases.append(_case("hrpo", impls, device, B, P, C, size, dtype, baseline="old_loop"))
    return cases


def _case(name, impls, device, B, P, C, size, dtype, baseline="hf_generate"):
    rows = compare(impls, device, baseline=baseline, warmup=1, reps=5, max_seconds=120)
    pre = rows.get("prefill", {}).get("ms")
    for n, r in rows.items():
        if "ms" not in r or n in ("prefill",):
            continue
        if n == "matmuls_alone":
            r["ms_per_step"] = round(r["ms"] / C, 3)
            continue
        r["tokens_per_s"] = round(B * C / (r["ms"] / 1e3), 1)
        if pre is not None:
            r["decode_ms_per_step"] = round((r["ms"] - pre) / (C - 1), 3)
    return dict(case=name, model=size, dtype=str(dtype).replace("torch.", ""), B=B, prompt=P, new_tokens=C,
                threads=torch.get_num_threads(), impls=rows)
