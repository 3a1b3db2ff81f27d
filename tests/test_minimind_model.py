"""MiniMind model: layout, HF/.pth round trips, gates, MoE dispatch, aux loss, caches,
PEFT, HybridThinkingLM and generate. Tiny configs, fp32 on CPU."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, StaticCache

from latentfast.models.minimind import (MiniMindConfig, MiniMindForCausalLM, checkpoint_name, load_pth,
                                        load_tokenizer, minimind_intermediate_size, save_pth)
from latentfast.models.minimind.modeling import MiniMindAttention, rope_tables
from latentfast.models.minimind.moe import balance_loss, route, sorted_dispatch
from latentfast.reference.minimind_moe import balance_loss_plain, moe_loop

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
            max_position_embeddings=256)


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return MiniMindForCausalLM(MiniMindConfig(**{**TINY, **kw}))


def test_config_defaults_and_size_rules():
    c = MiniMindConfig()
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (512, 8, 8, 2)
    assert (c.vocab_size, c.rope_theta, c.rms_norm_eps, c.max_position_embeddings) == (6400, 1e6, 1e-5, 32768)
    assert (c.num_experts_per_tok, c.n_routed_experts, c.n_shared_experts, c.aux_loss_alpha) == (2, 4, 1, 0.01)
    assert c.seq_aux and c.norm_topk_prob and c.tie_word_embeddings and not c.use_moe
    assert c.intermediate_size == 1408 and minimind_intermediate_size(640) == 1728  # 64*ceil(int(h*8/3)/64)
    with pytest.raises(ValueError, match="exclusive"):
        MiniMindConfig(headwise_attn_output_gate=True, elementwise_attn_output_gate=True)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        MiniMindConfig(use_moe=True, num_experts_per_tok=5)


@pytest.mark.parametrize("gate,rows", [(None, 640), ("headwise", 648), ("elementwise", 1280)])
def test_gate_widens_q_proj_as_the_fork(gate, rows):
    cfg = MiniMindConfig(hidden_size=640, headwise_attn_output_gate=gate == "headwise",
                         elementwise_attn_output_gate=gate == "elementwise")
    attn = MiniMindAttention(cfg, 0)
    assert tuple(attn.q_proj.weight.shape) == (rows, 640) and tuple(attn.o_proj.weight.shape) == (640, 640)


@pytest.mark.parametrize("gate", ["headwise", "elementwise"])
def test_gate_layout_interleaved_per_kv_group(gate):
    """q_proj rows per KV group are [n_rep*D queries | n_rep*G gates]; out *= sigmoid(gate)."""
    m = _model(**{f"{gate}_attn_output_gate": True}).eval()
    attn = m.model.layers[0].self_attn
    H, KV, D, G = 4, 2, 16, attn.gate_width
    n_rep = H // KV
    x = torch.randn(2, 5, 64)
    q, g = attn._split_query(attn.q_proj(x))
    W = attn.q_proj.weight.view(KV, n_rep * (D + G), 64)
    q_rows, g_rows = W[:, : n_rep * D].reshape(H, D, 64), W[:, n_rep * D:].reshape(H, G, 64)
    torch.testing.assert_close(q, torch.einsum("bth,ndh->btnd", x, q_rows))
    torch.testing.assert_close(g, torch.einsum("bth,ndh->btnd", x, g_rows))
    # zero gate rows -> sigmoid(0) = 1/2: the gated model is the ungated one at half attention output
    ref = _model().eval()
    with torch.no_grad():
        for la, lr in zip(m.model.layers, ref.model.layers):
            Wl = la.self_attn.q_proj.weight.view(KV, n_rep * (D + G), 64)
            Wl[:, n_rep * D:].zero_()
            lr.self_attn.q_proj.weight.copy_(Wl[:, : n_rep * D].reshape(-1, 64))
            lr.self_attn.o_proj.weight.copy_(la.self_attn.o_proj.weight * 0.5)
        for n, p in ref.named_parameters():
            if "q_proj" not in n and "o_proj" not in n:
                p.copy_(dict(m.named_parameters())[n])
    ids = torch.randint(0, 320, (2, 7))
    torch.testing.assert_close(m(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_hf_round_trip_identical_logits(tmp_path):
    m = _model(use_moe=True, headwise_attn_output_gate=True, inference_rope_scaling=True).eval()
    m.save_pretrained(tmp_path / "hf")
    cfg = AutoConfig.from_pretrained(tmp_path / "hf")
    assert cfg.model_type == "minimind" and cfg.headwise_attn_output_gate and cfg.use_moe
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert isinstance(m2, MiniMindForCausalLM) and m2.lm_head.weight is m2.model.embed_tokens.weight
    torch.testing.assert_close(m2.model.freqs_cos, m.model.freqs_cos, rtol=0, atol=0)
    ids = torch.randint(0, 320, (2, 9))
    assert torch.equal(m(ids).logits, m2(ids).logits)


def test_pth_round_trip_minimind_names_and_fp16(tmp_path):
    m = _model(use_moe=True).eval()
    path = save_pth(m, checkpoint_name("pretrain", 64, True, tmp_path))
    assert path.name == "pretrain_64_moe.pth" and checkpoint_name("full_sft", 512, False).name == "full_sft_512.pth"
    sd = torch.load(path, weights_only=True)
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.gate.weight",
            "model.layers.1.mlp.experts.3.down_proj.weight", "model.layers.0.mlp.shared_experts.0.up_proj.weight",
            "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"} <= set(sd)
    assert all(v.dtype == torch.float16 for v in sd.values())
    m2 = _model(seed=1, use_moe=True).eval()
    load_pth(m2, path)
    with torch.no_grad():
        want = {k: v.half().float() for k, v in m.state_dict().items()}
    for k, v in m2.state_dict().items():
        assert torch.equal(v, want[k]), k
    ddp_style = tmp_path / "ddp.pth"  # a "module." prefix (DDP-wrapped save) is accepted
    torch.save({"module." + k: v for k, v in m.state_dict().items()}, ddp_style)
    load_pth(m2, ddp_style)
    ids = torch.randint(0, 320, (1, 6))
    assert torch.equal(m(ids).logits, m2(ids).logits)
    with pytest.raises(FileNotFoundError, match="nope_64.pth"):
        load_pth(m2, tmp_path / "nope_64.pth")


@pytest.mark.parametrize("saved,loaded", [({}, {"headwise_attn_output_gate": True}),
                                          ({"headwise_attn_output_gate": True}, {}),
                                          ({"elementwise_attn_output_gate": True}, {"headwise_attn_output_gate": True})])
def test_gate_flag_mismatch_names_the_flag(tmp_path, saved, loaded):
    path = save_pth(_model(**saved), tmp_path / "w.pth")
    with pytest.raises(ValueError, match="attn_output_gate"):
        load_pth(_model(**loaded), path)


def test_gate_flag_mismatch_at_hf_load(tmp_path):
    _model(headwise_attn_output_gate=True).save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="headwise_attn_output_gate=1"):
        MiniMindForCausalLM.from_pretrained(tmp_path / "hf", headwise_attn_output_gate=False)
    with pytest.raises(ValueError, match="headwise_attn_output_gate=1"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "hf", config=MiniMindConfig(**TINY))


@pytest.mark.parametrize("k,N,n_experts", [(2, 37, 4), (1, 9, 4), (3, 2, 8)])
def test_sorted_dispatch_matches_per_expert_loop(k, N, n_experts):
    """Values and grads (input, router weights, expert weights) vs MiniMind's loop; with
    N=2, k=3 and 8 experts two experts or more get no token (they still get a zero gradient)."""
    cfg = MiniMindConfig(**{**TINY, "use_moe": True, "num_experts_per_tok": k, "n_routed_experts": n_experts})
    from latentfast.models.minimind.modeling import MiniMindMLP

    torch.manual_seed(0)
    experts = torch.nn.ModuleList([MiniMindMLP(cfg) for _ in range(n_experts)])
    gate_w = torch.randn(n_experts, 64, requires_grad=True)
    x = torch.randn(N, 64, requires_grad=True)
    dy = torch.randn(N, 64)
    results = []
    for fn in (sorted_dispatch, moe_loop):
        experts.zero_grad(set_to_none=True)
        x.grad = gate_w.grad = None
        _, w, idx = route(x, gate_w, k, True)
        y = fn(x, idx, w, experts)
        (y * dy).sum().backward()
        results.append((y.detach(), x.grad.clone(), gate_w.grad.clone() if gate_w.grad is not None else None,
                        [p.grad.clone() for p in experts.parameters()]))
    (y1, gx1, gw1, gp1), (y2, gx2, gw2, gp2) = results
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx1, gx2, rtol=1e-5, atol=1e-6)
    if k > 1:
        torch.testing.assert_close(gw1, gw2, rtol=1e-5, atol=1e-6)
    for a, b in zip(gp1, gp2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if n_experts == 8:
        assert any(float(g.abs().sum()) == 0.0 for g in gp1)  # an idle expert: present, zero


@pytest.mark.parametrize("seq_aux", [True, False])
def test_balance_loss_matches_plain_formula_and_grad(seq_aux):
    B, L, E, k = 3, 7, 4, 2
    logits = torch.randn(B * L, E, requires_grad=True)
    scores = logits.softmax(-1)
    idx = torch.topk(scores, k, dim=-1).indices
    a = balance_loss(scores, idx, B, 0.01, seq_aux)
    b = balance_loss_plain(scores, idx, B, 0.01, seq_aux)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    ga, = torch.autograd.grad(a, logits, retain_graph=True)
    gb, = torch.autograd.grad(b, logits)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-9)


def test_aux_loss_on_output_training_only():
    m = _model(use_moe=True)
    ids = torch.randint(0, 320, (2, 8))
    out = m(ids)
    layer_aux = [balance_loss(*_route_scores(m, ids, i), 2, 0.01, True) for i in range(2)]
    assert float(out.aux_loss.detach()) > 0
    torch.testing.assert_close(out.aux_loss, sum(layer_aux), rtol=1e-5, atol=1e-8)
    assert float(m.eval()(ids).aux_loss) == 0.0 and float(_model()(ids).aux_loss) == 0.0


def _route_scores(m, ids, layer):
    hidden = m(ids, output_hidden_states=True).hidden_states[layer]
    blk = m.model.layers[layer]
    cos_sin = (m.model.freqs_cos[: ids.shape[1]][None].expand(2, -1, -1),
               m.model.freqs_sin[: ids.shape[1]][None].expand(2, -1, -1))
    h = hidden + blk.self_attn(blk.input_layernorm(hidden), cos_sin)
    scores, _, idx = route(blk.post_attention_layernorm(h).reshape(-1, 64), blk.mlp.gate.weight, 2, True)
    return scores, idx


def test_inputs_embeds_padding_positions_and_hidden_states():
    m = _model(use_moe=True, headwise_attn_output_gate=True).eval()
    ids = torch.randint(1, 320, (2, 9))
    full = m(ids, output_hidden_states=True)
    assert len(full.hidden_states) == 3 and torch.equal(full.hidden_states[-1], m.model(ids).last_hidden_state)
    torch.testing.assert_close(m(inputs_embeds=m.get_input_embeddings()(ids)).logits, full.logits)
    # left padding + positions from the mask == the unpadded row
    padded = torch.cat([torch.zeros(2, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 9, dtype=torch.long)], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    torch.testing.assert_close(m(padded, attention_mask=mask, position_ids=pos).logits[:, 3:], full.logits,
                               rtol=1e-5, atol=1e-5)
    eager = _model(use_moe=True, headwise_attn_output_gate=True, flash_attn=False).eval()
    eager.load_state_dict(m.state_dict())
    torch.testing.assert_close(eager(padded, attention_mask=mask, position_ids=pos).logits[:, 3:], full.logits,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exactly one"):
        m()
    with pytest.raises(TypeError, match="Cache"):
        m(ids, past_key_values=[(torch.zeros(1), torch.zeros(1))])


def test_labels_loss_is_shifted_ce():
    m = _model()
    ids = torch.randint(0, 320, (2, 8))
    labels = ids.clone()
    labels[0, :3] = -100
    out = m(ids, labels=labels)
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 320), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref)


@pytest.mark.parametrize("cache_cls", [DynamicCache, StaticCache])
def test_cached_decode_matches_full_forward(cache_cls):
    m = _model(use_moe=True, elementwise_attn_output_gate=True).eval()
    ids = torch.randint(0, 320, (2, 12))
    full = m(ids).logits
    cache = DynamicCache(config=m.config) if cache_cls is DynamicCache else StaticCache(config=m.config,
                                                                                          max_cache_len=16)
    out = m(ids[:, :8], past_key_values=cache, use_cache=True)
    steps = [out.logits]
    for t in range(8, 12):
        steps.append(m(ids[:, t:t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_generate_greedy_dynamic_and_static_cache():
    m = _model(use_moe=True, headwise_attn_output_gate=True).eval()
    ids = torch.randint(3, 320, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    dyn = m.generate(ids, attention_mask=mask, **kw)
    static = m.generate(ids, attention_mask=mask, cache_implementation="static", **kw)
    assert torch.equal(dyn, static)
    seq, am = ids.clone(), mask.clone()  # no-cache greedy loop
    for _ in range(6):
        pos = (am.cumsum(-1) - 1).clamp(min=0)
        nxt = m(seq, attention_mask=am, position_ids=pos).logits[:, -1].argmax(-1, keepdim=True)
        seq, am = torch.cat([seq, nxt], 1), torch.cat([am, torch.ones_like(nxt)], 1)
    assert torch.equal(dyn, seq)


def test_decode_engine_greedy_equals_hf_generate():
    """latentfast.generation (static KV cache, fixed-shape step) on MiniMind, eager step."""
    from latentfast.generation import generate as engine_generate

    m = _model(use_moe=True, headwise_attn_output_gate=True).eval()
    ids = torch.randint(3, 320, (3, 6))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    hf = m.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    ro = engine_generate(m, ids, mask, 5, eos_token_id=[319], pad_token_id=0, compile=False)
    keep = ro.completion_mask.bool()
    assert torch.equal(ro.completion_ids[keep], hf[:, 6:6 + ro.completion_ids.shape[1]][keep])


def test_rope_yarn_only_changes_low_frequencies():
    cos, sin = rope_tables(64, 4096, 1e6)
    ycos, ysin = rope_tables(64, 4096, 1e6, {"factor": 16, "original_max_position_embeddings": 2048})
    assert torch.equal(cos[:, 0], ycos[:, 0]) and not torch.equal(cos[:, 31], ycos[:, 31])
    assert torch.equal(rope_tables(64, 1024, 1e6, {"original_max_position_embeddings": 2048})[0], cos[:1024])


def test_peft_lora_trains_only_adapters_and_merges():
    from peft import LoraConfig

    from latentfast.hf.adapter import wrap_peft  # get_peft_model without PEFT's transformers FutureWarning

    m = _model(use_moe=True, headwise_attn_output_gate=True)
    ids = torch.randint(0, 320, (2, 8))
    base = m.eval()(ids).logits
    pm = wrap_peft(m, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "gate_proj"],
                                 init_lora_weights=False))
    pm.train()
    out = pm(ids, labels=ids)
    (out.loss + out.aux_loss).backward()
    grads = {n for n, p in pm.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert any("experts.0.gate_proj.lora_A" in n for n in grads)
    pm.eval()
    adapted = pm(ids).logits
    assert not torch.allclose(adapted, base)
    torch.testing.assert_close(pm.merge_and_unload()(ids).logits, adapted, rtol=1e-4, atol=1e-4)


def test_hybrid_thinking_lm_over_minimind():
    """HRPO's wrapper: rollout with the KV cache, then the stored-state training forward
    reproduces the greedy rollout, and the GRPO loss backpropagates into LoRA + HRPO modules."""
    from latentfast.data import build_tokenizer, format_prompt, make_arithmetic
    from latentfast.generation import generate
    from latentfast.models import HybridThinkingLM
    from latentfast.train.rl.objectives import GRPOLoss

    tok = build_tokenizer()
    torch.manual_seed(0)
    lm = MiniMindForCausalLM(MiniMindConfig(**{**TINY, "vocab_size": 1088, "use_moe": True,
                                               "headwise_attn_output_gate": True}))
    m = HybridThinkingLM(lm).add_lora(4)
    m.eval()
    rows = make_arithmetic(3, seed=1)
    enc = tok([format_prompt(r["question"]) for r in rows], return_tensors="pt", padding=True)
    ro = generate(m, enc.input_ids, enc.attention_mask, 10, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, marker_ids=[tok.answer_marker_id], do_sample=False, compile=False)
    batch = ro.as_batch()
    hidden, _ = m.completion_hidden(batch)
    keep = batch["completion_mask"].bool()
    assert int(ro.thinking_mask.sum()) > 0
    assert torch.equal((hidden @ m.lm_head_weight().T).argmax(-1)[keep], batch["completion_ids"][keep])
    m.train()
    hidden, aux = m(batch)
    loss, _ = GRPOLoss(loss_type="grpo")(hidden, m.lm_head_weight(), m.lm_head_bias(), batch["completion_ids"],
                                         batch["completion_mask"], torch.randn(3))
    (loss + aux).backward()
    names = {n for n, p in m.named_parameters() if p.grad is not None}
    assert any("lora_" in n for n in names) and any("thinking" in n for n in names)


def test_tokenizers_shipped():
    t = load_tokenizer()
    assert len(t) == 6400 and (t.pad_token_id, t.bos_token_id, t.eos_token_id) == (0, 1, 2)
    assert t("<think>").input_ids == [30, 450, 1573, 32]  # not a special token in the note-era tokenizer
    text = t.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n" \
                   "<|im_start|>assistant\n"
    t3 = load_tokenizer("minimind-3")
    assert t3.convert_tokens_to_ids(["<think>", "</think>"]) == [25, 26] and t3("<think>").input_ids == [25]
    with pytest.raises(ValueError, match="minimind-2510"):
        load_tokenizer("v1")
