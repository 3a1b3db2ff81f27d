"""The decode engine against HF generate, the reference loop and exact distributions."""
import logging
import math

import pytest
import torch

from latentfast.data import build_tokenizer, format_prompt, make_arithmetic
from latentfast.generation import ThinkingPolicy, decode, generate
from latentfast.generation.sampling import sample
from latentfast.models import HybridConfig, HybridThinkingLM, build_tiny_causal_lm
from latentfast.reference.generation import hybrid_generate, reference_sample

TOK = build_tokenizer()


pytestmark = pytest.mark.usefixtures("one_thread")


def _lm(**kw):
    torch.manual_seed(0)
    # a wide init: the default one's greedy output repeats one token, whatever the prompt
    return build_tiny_causal_lm(TOK, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                                initializer_range=0.3, **kw).eval()


def _prompts(n=6, seed=1):
    rows = make_arithmetic(n, seed=seed)
    TOK.padding_side = "left"
    enc = TOK([format_prompt(r["question"]) for r in rows], return_tensors="pt", padding=True)
    assert len(set(enc.attention_mask.sum(1).tolist())) > 1  # left padding of different lengths
    return enc.input_ids, enc.attention_mask


def _eos_at_different_steps(free):
    """Promote tokens the random model does emit to EOS ids, so rows end at different steps."""
    return [TOK.eos_token_id, int(free[0, 3]), int(free[1, 7])]


def test_greedy_matches_hf_generate_with_several_eos_ids():
    lm = _lm()
    ids, mask = _prompts()
    free = generate(lm, ids, mask, 16, eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id, compile=False)
    eos = _eos_at_different_steps(free.completion_ids)
    ro = generate(lm, ids, mask, 16, eos_token_id=eos, pad_token_id=TOK.pad_token_id, compile=False)
    hf = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=eos,
                     pad_token_id=TOK.pad_token_id)[:, ids.shape[1]:]
    assert torch.equal(ro.completion_ids, hf)
    lengths = ro.completion_mask.sum(1)
    assert len(set(lengths.tolist())) > 1 and int(lengths.min()) < 16  # rows end at different steps
    for row, n in zip(ro.completion_ids, lengths.tolist()):
        assert int(row[n - 1]) in eos or n == ro.completion_ids.shape[1]
        assert (row[n:] == TOK.pad_token_id).all()
    ref = hybrid_generate(lm, ids, mask, 16, eos_token_id=eos, pad_token_id=TOK.pad_token_id)
    assert torch.equal(ro.completion_ids, ref["completion_ids"])
    assert torch.equal(ro.completion_mask, ref["completion_mask"])
    assert not ro.thinking_mask.any() and ro.thinking_hidden.shape == (0, 64)


def test_greedy_matches_hf_generate_under_peft_and_for_llama():
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    from latentfast.hf.adapter import wrap_peft  # get_peft_model without PEFT's transformers FutureWarning

    ids, mask = _prompts(4)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(TOK), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    peft = wrap_peft(_lm(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    for m in (llama, peft):
        ro = generate(m, ids, mask, 10, eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id, compile=False)
        hf = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                        eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id)[:, ids.shape[1]:]
        assert torch.equal(ro.completion_ids, hf), type(m).__name__


@pytest.mark.parametrize("state", ["projection", "soft_embedding"])
@pytest.mark.parametrize("do_sample", [False, True])
def test_hrpo_policy_matches_reference_loop(state, do_sample):
    torch.manual_seed(0)
    m = HybridThinkingLM(_lm(), HybridConfig(thinking_state=state)).add_lora(4).eval()
    ids, mask = _prompts(5, seed=3)
    kw = dict(pad_token_id=TOK.pad_token_id, temperature=1.0, do_sample=do_sample)

    def run(eos, marker, every=8):
        g = torch.Generator().manual_seed(7)
        ro = decode(m, ids, mask, 20, ThinkingPolicy(marker, eos, **kw), generator=g, check_every=every,
                    compile=False)
        g = torch.Generator().manual_seed(7)
        return ro, hybrid_generate(m, ids, mask, 20, eos_token_id=eos, marker_ids=marker, generator=g, **kw)

    free, _ = run(TOK.eos_token_id, [TOK.answer_marker_id])
    eos = [TOK.eos_token_id, int(free.completion_ids[0, 9])]
    marker = [int(free.completion_ids[1, 3]), int(free.completion_ids[1, 4])]  # a two-token marker
    for every in (1, 8):
        ro, ref = run(eos, marker, every)
        for name in ("completion_ids", "completion_mask", "thinking_mask"):
            assert torch.equal(getattr(ro, name), ref[name]), name
        n = int(ro.thinking_mask.sum())
        assert 0 < n < int(ro.completion_mask.sum()) and ro.thinking_hidden.shape == (n, 64)
        assert not ro.thinking_mask[1, 5:].any()  # row 1 left thinking at its marker
        torch.testing.assert_close(ro.thinking_hidden, ref["thinking_hidden"], rtol=1e-4, atol=1e-4)  # fp32 rounding
        torch.testing.assert_close(ro.embeds_ratio, ref["embeds_ratio"], rtol=1e-5, atol=1e-6)


def test_seeded_sampling_is_reproducible_and_uses_today_s_random_stream():
    lm = _lm()
    ids, mask = _prompts(4)
    kw = dict(eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id, do_sample=True, temperature=1.3,
              compile=False)
    runs = [generate(lm, ids, mask, 12, generator=torch.Generator().manual_seed(s), **kw).completion_ids
            for s in (5, 5, 6)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    ref = hybrid_generate(lm, ids, mask, 12, eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id,
                          do_sample=True, temperature=1.3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(runs[0], ref["completion_ids"])  # same draws as the old sampler


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit (Wilson-Hilferty normal approximation)."""
    keep = probs > 0
    n = counts.sum()
    exp = probs[keep] * n
    stat = float(((counts[keep] - exp) ** 2 / exp).sum())
    k = int(keep.sum()) - 1
    z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.8), (6, 0.9)])
def test_sampler_distribution_matches_the_filtered_softmax(top_k, top_p):
    """Token frequencies over many rows == softmax(logits / T) restricted by top-k/top-p."""
    g = torch.Generator().manual_seed(0)
    V, N, T = 12, 60000, 0.8
    logits = torch.randn(V, generator=g) * 1.5
    probs = torch.softmax(logits / T, -1)
    order = probs.argsort(descending=True)
    keep = torch.zeros(V, dtype=torch.bool)
    keep[order[:top_k or V]] = True
    p = torch.where(keep, probs, 0.0)
    p = p / p.sum()
    sp = p[order]
    keep &= torch.zeros(V, dtype=torch.bool).scatter(0, order, sp.cumsum(0) - sp <= top_p)
    target = torch.where(keep, p, 0.0)
    target = target / target.sum()
    noise = torch.empty(N, V).exponential_(generator=g)
    tok, dist = sample(logits.expand(N, V), noise, T, top_k, top_p)
    counts = torch.bincount(tok, minlength=V).double()
    assert (counts[target == 0] == 0).all()
    assert _chi2_pvalue(counts, target.double()) > 1e-4
    torch.testing.assert_close(dist[0], target.float(), rtol=1e-5, atol=1e-7)
    if top_k == 0:  # without top-k it is today's sampler, draw for draw
        ref_tok, _ = reference_sample(logits.expand(N, V), T, top_p, True, torch.Generator().manual_seed(1))
        tok2, _ = sample(logits.expand(N, V), torch.empty(N, V).exponential_(generator=torch.Generator().manual_seed(1)),
                         T, 0, top_p)
        assert torch.equal(tok2, ref_tok)


def test_engine_first_token_distribution_matches_the_model():
    """End to end on a 16-token vocabulary: rows of one prompt sample the model's softmax."""
    from transformers import Qwen2ForCausalLM

    from latentfast.models.tiny import tiny_config

    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(tiny_config(16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=64, initializer_range=0.5)).eval()
    N = 20000
    ids = torch.tensor([[3, 5, 7, 9]]).expand(N, 4)
    mask = torch.ones_like(ids)
    ro = generate(lm, ids, mask, 1, eos_token_id=15, pad_token_id=0, do_sample=True, temperature=1.0,
                  generator=torch.Generator().manual_seed(0), compile=False)
    with torch.no_grad():
        probs = torch.softmax(lm(ids[:1]).logits[0, -1].double(), -1)
    counts = torch.bincount(ro.completion_ids[:, 0], minlength=16).double()
    assert float(probs.max()) > 2 / 16  # not near uniform: the test can tell distributions apart
    assert _chi2_pvalue(counts, probs) > 1e-4


def test_bad_arguments_name_themselves():
    lm = _lm()
    ids, mask = _prompts(3)
    kw = dict(eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id)
    for bad, match in [(dict(temperature=0.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_k=-1), "top_k"),
                       (dict(eos_token_id=[]), "eos_token_id")]:
        with pytest.raises(ValueError, match=match):
            generate(lm, ids, mask, 2, **{**kw, **bad})
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(lm, ids, mask, 0, **kw)
    with pytest.raises(ValueError, match="attention_mask"):
        generate(lm, ids, mask[:, 1:], 2, **kw)
    with pytest.raises(TypeError, match="HybridThinkingLM"):
        decode(lm, ids, mask, 2, ThinkingPolicy([1], **kw), compile=False)


@pytest.mark.slow
def test_compiled_step_matches_eager():
    """The one compile test (a 1-layer model, a few steps): the Inductor step == eager."""
    torch.manual_seed(0)
    lm = build_tiny_causal_lm(TOK, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=1, intermediate_size=64, initializer_range=0.3).eval()
    ids, mask = _prompts(3)
    kw = dict(eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id)
    eager = generate(lm, ids, mask, 6, compile=False, **kw)
    compiled = generate(lm, ids, mask, 6, compile=True, **kw)
    assert torch.equal(compiled.completion_ids, eager.completion_ids)
    assert len(set(eager.completion_ids[0].tolist())) > 1


def test_compile_failure_falls_back_to_eager_with_one_log_line(monkeypatch, caplog):
    from latentfast.generation import engine

    lm = _lm()
    ids, mask = _prompts(3)
    kw = dict(eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id)
    eager = generate(lm, ids, mask, 6, compile=False, **kw)
    monkeypatch.setattr(engine._CompiledStep, "_compiled", {})
    monkeypatch.setattr(engine._CompiledStep, "_failed", set())

    def broken(*a, **k):
        raise RuntimeError("cannot compile this")

    monkeypatch.setattr(engine.torch, "compile", lambda fn, **k: broken)
    with caplog.at_level(logging.WARNING, logger="latentfast.generation"):
        for _ in range(2):
            fallback = generate(lm, ids, mask, 6, compile=True, **kw)
            assert torch.equal(fallback.completion_ids, eager.completion_ids)
    lines = [r for r in caplog.records if "decoding eagerly" in r.getMessage()]
    assert len(lines) == 1 and "cannot compile this" in lines[0].getMessage()


def test_compiled_decodes_reuse_their_buffers_and_results_are_copies(monkeypatch):
    """A compiled step's mutated buffers (static cache, mask, positions, the policy's outputs)
    come from a per-model pool: the next decode of the same shapes gets the same storage
    (CUDA graphs replay fixed addresses), other shapes get their own, and what a call
    returned is a copy the next call does not touch. The compiled path runs the eager step
    here (compiling costs ~30 s on this CPU; test_compiled_step_matches_eager compiles)."""
    from latentfast.generation import engine

    monkeypatch.setattr(engine._CompiledStep, "get", classmethod(lambda cls, device: (engine._step, None)))
    lm = _lm()
    decoder = engine.DecoderParts(lm).decoder
    engine.BufferPool._pools.pop(decoder, None)
    kw = dict(eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id)
    (ids_a, mask_a), (ids_b, mask_b) = _prompts(6, seed=1), _prompts(6, seed=2)
    ids_b, mask_b = ids_b[:, -ids_a.shape[1]:], mask_b[:, -ids_a.shape[1]:]  # same B x P, other prompts

    def pointers():
        (bufs,) = engine.BufferPool._pools[decoder].values()
        return {k: v.data_ptr() for k, v in bufs.items() if isinstance(v, torch.Tensor)} | {
            "cache": bufs["cache"].layers[0].keys.data_ptr()}

    a = generate(lm, ids_a, mask_a, 8, compile=True, **kw)
    first, kept = pointers(), a.completion_ids.clone()
    assert {"attn", "pos", "col", "t", "tokens", "mask", "finished", "cache"} <= first.keys()
    b = generate(lm, ids_b, mask_b, 8, compile=True, **kw)
    assert pointers() == first  # the same storage, refilled
    assert torch.equal(a.completion_ids, kept)  # the first result is not a view of a pooled buffer
    for (ids, mask), ro in (((ids_a, mask_a), a), ((ids_b, mask_b), b)):
        eager = generate(lm, ids, mask, 8, compile=False, **kw)  # (eager decodes use no pool)
        assert torch.equal(ro.completion_ids, eager.completion_ids)
        assert torch.equal(ro.completion_mask, eager.completion_mask)
    generate(lm, ids_a[:3], mask_a[:3], 8, compile=True, **kw)
    assert len(engine.BufferPool._pools[decoder]) == 2  # another batch size: its own set

    # the thinking policy's recorded states are copies too
    torch.manual_seed(0)
    m = HybridThinkingLM(_lm(), HybridConfig()).eval()
    hk = dict(eos_token_id=[TOK.eos_token_id], pad_token_id=TOK.pad_token_id, do_sample=True)

    def think(seed, compiled):
        return decode(m, ids_a, mask_a, 8, ThinkingPolicy([TOK.answer_marker_id], **hk),
                      generator=torch.Generator().manual_seed(seed), compile=compiled)

    r0 = think(0, True)
    saved = (r0.thinking_hidden.clone(), r0.thinking_mask.clone(), r0.completion_ids.clone())
    think(1, True)
    assert all(torch.equal(x, y) for x, y in zip((r0.thinking_hidden, r0.thinking_mask, r0.completion_ids), saved))
    engine.BufferPool._pools.pop(engine.DecoderParts(m).decoder, None)
    fresh = think(0, True)  # a new pool: reusing storage must not change a single bit
    assert torch.equal(fresh.completion_ids, r0.completion_ids) and torch.equal(fresh.thinking_hidden, r0.thinking_hidden)
    # Eager decodes size the cache to exactly P + C slots, compiled ones to a bucket (64 here): attention
    # then reduces over a different number of (masked) slots, so hidden states agree to fp32 rounding, not bits.
    ref = think(0, False)
    assert torch.equal(ref.completion_ids, r0.completion_ids)
    torch.testing.assert_close(ref.thinking_hidden, r0.thinking_hidden, rtol=1e-5, atol=1e-5)
