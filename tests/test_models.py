"""Hybrid-thinking model layer: generation, stored-state training forward, two-pass parity."""
import pytest
import torch

from latentfast.data import build_tokenizer, format_prompt, make_arithmetic
from latentfast.generation import generate
from latentfast.models import HRPO_MODULES, HybridConfig, HybridThinkingLM, build_tiny_causal_lm
from latentfast.train.rl.objectives import GRPOLoss

TOK = build_tokenizer()


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(cfg=None, lora=True, **overrides):
    torch.manual_seed(0)
    m = HybridThinkingLM(build_tiny_causal_lm(TOK, **overrides), cfg or HybridConfig())
    return m.add_lora(8) if lora else m


def _rollout(m, n=4, greedy=False, max_new=20):
    rows = make_arithmetic(n, seed=1)
    enc = TOK([format_prompt(r["question"]) for r in rows], return_tensors="pt", padding=True)
    g = torch.Generator().manual_seed(0)
    return generate(m, enc.input_ids, enc.attention_mask, max_new, eos_token_id=TOK.eos_token_id,
                    pad_token_id=TOK.pad_token_id, marker_ids=[TOK.answer_marker_id], temperature=1.0,
                    do_sample=not greedy, generator=g)


def _grpo(m, batch, adv, ref=None, old=None, recompute="stored", beta=0.0):
    """HRPO's loss: the model's completion hidden states into the GRPO objective (the recipe's type)."""
    hidden, aux = m(batch, recompute=recompute)
    loss, metrics = GRPOLoss(loss_type="grpo", beta=beta)(hidden, m.lm_head_weight(), m.lm_head_bias(),
                                                         batch["completion_ids"], batch["completion_mask"], adv,
                                                         ref=ref, old=old)
    return loss + aux, metrics


def _loss_and_grads(m, batch, adv, recompute, ref=None, old=None):
    m.zero_grad(set_to_none=True)
    loss, metrics = _grpo(m, batch, adv, ref, old, recompute=recompute, beta=0.04 if ref is not None else 0.0)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def test_rollout_shapes_and_packed_states():
    m = _model()
    ro = _rollout(m)
    B, C = ro.completion_ids.shape
    assert ro.thinking_mask.shape == (B, C) and ro.thinking_mask.dtype == torch.bool
    n = int(ro.thinking_mask.sum())
    assert n > 0 and ro.thinking_hidden.shape == (n, m.config.hidden_size)  # N_think x D, not B x T x D
    assert ro.embeds_ratio.shape == (n,) and bool(((ro.embeds_ratio > 0) & (ro.embeds_ratio < 1)).all())
    assert not bool((ro.thinking_mask & ~ro.completion_mask.bool()).any())


def test_training_forward_reproduces_greedy_rollout():
    """Stored states + fused residual in one parallel forward = what generation saw."""
    m = _model()
    ro = _rollout(m, greedy=True)
    b = ro.as_batch()
    hidden, _ = m.completion_hidden(b)
    pred = (hidden @ m.lm_head_weight().T).argmax(-1)
    keep = b["completion_mask"].bool()
    assert torch.equal(pred[keep], b["completion_ids"][keep])


@pytest.mark.parametrize("with_ref", [False, True])
def test_stored_matches_two_pass_and_projection_gets_gradient(with_ref):
    """fp32, unchanged policy: stored design == recipe's two-pass (rel. tol 1e-4)."""
    m = _model()
    ro = _rollout(m, n=6)
    b = ro.as_batch()
    lp = m.per_token_logps(b)
    adv = torch.randn(6)
    ref = lp - 0.1 if with_ref else None
    old = lp + 0.05 * torch.randn_like(lp)  # ratios away from 1 so clipping paths run
    l1, g1 = _loss_and_grads(m, b, adv, "stored", ref, old)
    l2, g2 = _loss_and_grads(m, b, adv, "two_pass", ref, old)
    torch.testing.assert_close(l1, l2, rtol=1e-4, atol=1e-6)
    assert g1.keys() == g2.keys()
    for name in g1:
        scale = g1[name].abs().max().clamp(min=1e-8)
        assert (g1[name] - g2[name]).abs().max() / scale < 1e-4, name
    proj = [g for n, g in g1.items() if "thinking_projection" in n]
    assert len(proj) == 1 and proj[0].norm() > 0
    for name in ("thinking_residual_gate_r", "thinking_residual_gate_i", "thinking_residual_Lambda", "lora_B"):
        assert any(name in n and g.norm() > 0 for n, g in g1.items()), name


def test_no_thinking_positions_still_give_thinking_modules_a_gradient():
    """A micro-batch with nothing mixed: thinking modules get zero (not missing) grads,
    as DDP without find_unused_parameters requires."""
    m = _model()
    b = _rollout(m).as_batch()
    b["thinking_mask"] = torch.zeros_like(b["thinking_mask"])
    b["thinking_hidden"] = b["thinking_hidden"][:0]
    loss, _ = _grpo(m, b, torch.randn(4))
    loss.backward()
    trainable = [(n, p) for n, p in m.thinking.named_parameters() if p.requires_grad]
    assert trainable
    for n, p in trainable:
        assert p.grad is not None and not p.grad.any(), n


def test_two_pass_clean_is_the_recipe_verbatim_and_runs():
    m = _model()
    b = _rollout(m).as_batch()
    loss, _ = _grpo(m, b, torch.randn(4), recompute="two_pass_clean")
    loss.backward()
    assert m.thinking.projection.weight.grad is not None


def test_peft_names_and_reference_is_adapters_disabled():
    m = _model()
    names = [n for n, _ in m.named_modules()]
    for mod in HRPO_MODULES:
        assert any(n.endswith(mod + ".modules_to_save.default") for n in names), mod
    b = _rollout(m).as_batch()
    before = m.per_token_logps(b)
    with torch.no_grad():  # move the trainable copies; the reference must not move
        for n, p in m.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    after = m.per_token_logps(b)
    with m.reference():
        ref = m.per_token_logps(b)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(ref, before)


@pytest.mark.parametrize("cfg", [HybridConfig(thinking_state="soft_embedding"), HybridConfig(projection="layernorm"),
                                 HybridConfig(projection="mlp")])
def test_thinking_state_variants(cfg):
    m = _model(cfg)
    ro = _rollout(m, greedy=True)
    b = ro.as_batch()
    hidden, _ = m.completion_hidden(b)
    keep = b["completion_mask"].bool()
    assert torch.equal((hidden @ m.lm_head_weight().T).argmax(-1)[keep], b["completion_ids"][keep])
    loss, _ = _grpo(m, b, torch.randn(4))
    loss.backward()
    grads = [p.grad for n, p in m.named_parameters() if "thinking_projection" in n and p.grad is not None]
    if cfg.thinking_state == "soft_embedding":
        assert m.thinking.projection is None and not grads
    else:
        assert grads and all(g.norm() > 0 for g in grads)


def test_answer_marker_ends_thinking():
    m = _model()
    ro = _rollout(m, n=8, max_new=30)
    for row_ids, row_think in zip(ro.completion_ids, ro.thinking_mask):
        hits = (row_ids == TOK.answer_marker_id).nonzero()
        if len(hits):
            assert not bool(row_think[hits[0, 0]:].any())


def test_wraps_llama_without_peft():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(TOK), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    m = HybridThinkingLM(LlamaForCausalLM(cfg))
    b = _rollout(m).as_batch()
    loss, _ = _grpo(m, b, torch.randn(4))
    loss.backward()
    assert m.thinking.projection.weight.grad.norm() > 0


@pytest.mark.cuda
def test_cuda_parity_fp32_and_bf16_autocast_step():
    """Real Triton kernels: fp32 stored == two-pass; bf16 autocast rollout + step runs."""
    m = _model().cuda()
    rows = make_arithmetic(8, seed=1)
    enc = TOK([format_prompt(r["question"]) for r in rows], return_tensors="pt", padding=True).to("cuda")
    ro = generate(m, enc.input_ids, enc.attention_mask, 20, eos_token_id=TOK.eos_token_id,
                  pad_token_id=TOK.pad_token_id, marker_ids=[TOK.answer_marker_id], do_sample=True, temperature=1.0)
    b = ro.as_batch()
    adv = torch.randn(8, device="cuda")
    l1, g1 = _loss_and_grads(m, b, adv, "stored")
    l2, g2 = _loss_and_grads(m, b, adv, "two_pass")
    torch.testing.assert_close(l1, l2, rtol=1e-4, atol=1e-5)
    for name in g1:
        assert (g1[name] - g2[name]).abs().max() / g1[name].abs().max().clamp(min=1e-8) < 1e-3, name
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ro = generate(m, enc.input_ids, enc.attention_mask, 20, eos_token_id=TOK.eos_token_id,
                      pad_token_id=TOK.pad_token_id, marker_ids=[TOK.answer_marker_id], do_sample=True,
                      temperature=1.0)
        loss, _ = _grpo(m, ro.as_batch(), adv)
    loss.backward()
    assert torch.isfinite(loss) and m.thinking.projection.weight.grad.norm() > 0


def test_pretrained_loads_are_local_only(tmp_path):
    from latentfast.models.local import load_causal_lm

    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_causal_lm(missing, "cpu")
    with pytest.raises(FileNotFoundError, match="not found locally"):
        HybridThinkingLM.from_pretrained("some-org/some-model-not-cached")
    build_tiny_causal_lm(TOK).save_pretrained(str(tmp_path / "tiny"))
    m = HybridThinkingLM.from_pretrained(str(tmp_path / "tiny"))
    assert m.config.hidden_size > 0


def test_generation_stops_on_any_of_several_eos_ids():
    """Chat checkpoints end turns with several ids (e.g. <|im_end|> and <|endoftext|>)."""
    m = _model().eval()
    rows = make_arithmetic(3, seed=1)
    enc = TOK([format_prompt(r["question"]) for r in rows], return_tensors="pt", padding=True)
    kw = dict(pad_token_id=TOK.pad_token_id, marker_ids=[TOK.answer_marker_id], do_sample=False)
    free = generate(m, enc.input_ids, enc.attention_mask, 8, eos_token_id=TOK.eos_token_id, **kw)
    stop = int(free.completion_ids[0, 2])  # row 0's third token becomes a second EOS
    first = int((free.completion_ids[0] == stop).nonzero()[0])
    ro = generate(m, enc.input_ids, enc.attention_mask, 8, eos_token_id=[TOK.eos_token_id, stop], **kw)
    assert ro.completion_mask[0].tolist() == [1] * (first + 1) + [0] * (ro.completion_mask.shape[1] - first - 1)
    assert (ro.completion_ids[0, first + 1:] == TOK.pad_token_id).all()
    assert not ro.thinking_mask[0, first:].any()  # an EOS token is never mixed
    torch.testing.assert_close(ro.completion_ids[:, :first + 1], free.completion_ids[:, :first + 1])
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(m, enc.input_ids, enc.attention_mask, 2, eos_token_id=[], **kw)


def test_eos_token_ids_merges_tokenizer_and_generation_config():
    from types import SimpleNamespace

    from latentfast.generation import eos_token_ids

    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[7, TOK.eos_token_id, 9]))
    assert eos_token_ids(TOK, model) == [TOK.eos_token_id, 7, 9]
    assert eos_token_ids(TOK, SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=5))) == [TOK.eos_token_id, 5]
    assert eos_token_ids(TOK) == [TOK.eos_token_id]


@pytest.mark.parametrize("state", ["projection", "soft_embedding"])
def test_rollout_is_independent_of_the_host_sync_interval(state):
    """check_every only changes when the host looks: same tokens, masks and states,
    with rows ending (and leaving the thinking phase) at different steps."""
    m = _model(HybridConfig(thinking_state=state)).eval()
    rows = make_arithmetic(5, seed=3)
    enc = TOK([format_prompt(r["question"]) for r in rows], return_tensors="pt", padding=True)

    def run(every, eos, marker):
        g = torch.Generator().manual_seed(7)
        return generate(m, enc.input_ids, enc.attention_mask, 24, eos_token_id=eos, pad_token_id=TOK.pad_token_id,
                        marker_ids=marker, do_sample=True, temperature=1.0, generator=g, check_every=every)

    free = run(1, TOK.eos_token_id, [TOK.answer_marker_id])
    # the tiny random model never says EOS or "####": promote tokens it does sample
    eos, marker = [TOK.eos_token_id, int(free.completion_ids[0, 9])], [int(free.completion_ids[1, 4])]
    out = [run(every, eos, marker) for every in (1, 3, 64)]
    ref = out[0]
    assert ref.completion_mask[0].sum() <= 10 and ref.thinking_mask[1, 5:].sum() == 0
    assert ref.thinking_hidden.shape[0] == int(ref.thinking_mask.sum()) > 0
    for ro in out[1:]:
        for name in ("completion_ids", "completion_mask", "thinking_mask"):
            assert torch.equal(getattr(ro, name), getattr(ref, name)), name
        torch.testing.assert_close(ro.thinking_hidden, ref.thinking_hidden)
        torch.testing.assert_close(ro.embeds_ratio, ref.embeds_ratio)
    # every row ends at its first token: the steps decoded past the end are trimmed
    stop_all = [TOK.eos_token_id] + free.completion_ids[:, 0].tolist()
    for every in (1, 64):
        ro = run(every, stop_all, marker)
        assert ro.completion_ids.shape[1] == 1 and ro.thinking_hidden.shape[0] == 0


def test_activation_checkpointing_same_loss_and_grads_less_saved_memory():
    from latentfast.profiling import saved_activation_bytes

    m = _model()
    batch = _rollout(m).as_batch()
    adv = torch.randn(4)
    m.train()
    _, plain_saved = saved_activation_bytes(lambda: _grpo(m, batch, adv)[0])
    l1, g1 = _loss_and_grads(m, batch, adv, "stored")
    m.enable_activation_checkpointing()
    m.train()
    _, ckpt_saved = saved_activation_bytes(lambda: _grpo(m, batch, adv)[0])
    l2, g2 = _loss_and_grads(m, batch, adv, "stored")
    torch.testing.assert_close(l1, l2)
    assert g1.keys() == g2.keys() and len(g1) > 0
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-4, atol=1e-6, msg=name)
    assert ckpt_saved < plain_saved / 2, (ckpt_saved, plain_saved)
