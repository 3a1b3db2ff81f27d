"""KV distillation: capture hooks vs the cache/eager attention, zero losses for student = teacher,
training steps, the recipe's log tags and --compare."""
import copy
import json

import pytest
import torch

from latentfast.data import build_tokenizer, make_arithmetic
from latentfast.hf.adapter import cache_kwarg as _cache_kwarg
from latentfast.hf.adapter import new_cache
from latentfast.hf.capture import KVCapture
from latentfast.models import build_tiny_causal_lm
from latentfast.ops import attention_token_importance
from latentfast.runtime.device import amp_context
from latentfast.train import kv_distill
from latentfast.train.kv_distill.spec import TeacherSpec

STUDENT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=128)
TEACHER = dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=3,
               intermediate_size=160)


@pytest.fixture(autouse=True)
def _reference_ops(request, monkeypatch):
    """Trainer logic runs the ops' PyTorch references: the Triton interpreter would spend
    minutes on the fused kernels, which their own tests cover. Tests named ``*_fused`` keep it."""
    if not request.node.name.endswith("_fused"):
        monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _args(**kw):
    a = kv_distill.build_parser().parse_args([])
    a.max_length, a.batch_size = 96, 4
    for k, v in kw.items():
        setattr(a, k, v)
    return a


def _distiller(student, teacher, args):
    """The one distiller with ``teacher`` as its only teacher (what ``--teacher_model`` builds)."""
    t = kv_distill.online_teacher(TeacherSpec(model="teacher", name="teacher"), teacher, student.config,
                                  kv_layers=args.kv_layers, importance_layer=args.importance_layer)
    return kv_distill.KVDistiller(student, [t], args), t


def _targets(t, d, b, step, amp):
    return [t.targets(b, need_importance=d.need_importance(step), stats=False, hidden=d.need_hidden, amp=amp)]


def _batch(tok, n=4, seed=0):
    return kv_distill.encode(tok, make_arithmetic(n, seed=seed), 96, torch.device("cpu"))


def test_capture_matches_cache_and_eager_attention_fused(tok):
    lm = build_tiny_causal_lm(tok, **STUDENT)
    b = _batch(tok)
    ids, mask = b["input_ids"], b["attention_mask"]
    cache = new_cache(lm.config)
    with KVCapture(lm, [0, 1], [1]) as cap:
        lm.model(input_ids=ids, attention_mask=mask, use_cache=True, **{_cache_kwarg(lm.model): cache})
    for i in (0, 1):
        k, v = cap.kv(i)
        torch.testing.assert_close(k, cache.layers[i].keys)
        torch.testing.assert_close(v, cache.layers[i].values)
    q, k = cap.qk(1)
    lm.config._attn_implementation = "eager"  # the recipe's path: output_attentions
    attn = lm.model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[1]
    torch.testing.assert_close(attention_token_importance(q, k, attention_mask=mask),
                               attention_token_importance(attn, attention_mask=mask), atol=1e-5, rtol=1e-4)


def test_losses_zero_when_student_is_teacher(tok):
    teacher = build_tiny_causal_lm(tok, **STUDENT).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    args = _args(use_attention_weighted_kv=True, attention_weighted_kv_warmup=0, cka_weight=1.0, cka_layers="all",
                 codi_weight=1.0)
    d, t = _distiller(student, teacher, args)
    assert d.codi[0].proj is None  # same widths: no projection
    b = _batch(tok)
    amp = amp_context(torch.device("cpu"), False)
    for teacher_attention in (False, True):
        d.use_teacher_attention = d.mt.kv[0].use_teacher_attention = teacher_attention
        t_out = _targets(t, d, b, 5, amp)
        _, met = d(b, t_out, step=5)
        assert d.mt.last_weighted
        assert float(met["kv"]) == pytest.approx(0.0, abs=1e-10) and float(met["kv_mse"]) == pytest.approx(0.0, abs=1e-10)
        assert float(met["cka"]) == pytest.approx(0.0, abs=1e-5)
        assert float(met["codi"]) == pytest.approx(0.0, abs=1e-6)


def test_a_few_steps_decrease_the_loss_across_shapes(tok):
    """Different widths, depths and KV-head counts: projections, layer pairs, CKA and CODI."""
    torch.manual_seed(0)
    teacher = build_tiny_causal_lm(tok, **TEACHER).eval().requires_grad_(False)
    student = build_tiny_causal_lm(tok, **STUDENT)
    args = _args(use_attention_weighted_kv=True, use_teacher_attention=True, attention_weighted_kv_warmup=3,
                 cka_weight=0.05, codi_weight=0.1)
    d, t = _distiller(student, teacher, args)
    assert t.pairs == [(0, 1), (1, 2)]
    amp = amp_context(torch.device("cpu"), False)
    opt = torch.optim.AdamW(d.parameters(), lr=3e-3)
    b = _batch(tok, n=8, seed=2)
    hist = []
    for step in range(8):
        t_out = _targets(t, d, b, step, amp)
        assert (t_out[0]["importance"] is not None) == (step >= 3)
        loss, met = d(b, t_out, step)
        loss.backward()
        opt.step()
        opt.zero_grad()
        hist.append({k: float(v) for k, v in met.items()})
    assert hist[-1]["loss"] < 0.8 * hist[0]["loss"]
    assert hist[-1]["kv"] < hist[0]["kv"] and hist[-1]["ce"] < hist[0]["ce"]
    assert all(p.grad is None for p in teacher.parameters())


def test_warmup_tags(tok):
    teacher = build_tiny_causal_lm(tok, **STUDENT)
    d, _ = _distiller(build_tiny_causal_lm(tok, **STUDENT), teacher,
                      _args(use_attention_weighted_kv=True, attention_weighted_kv_warmup=1000))
    assert d.status(500) == "[Attn-warmup: 500 steps]"
    assert d.status(1000) == "[Student-Attn-weighted]"
    d, _ = _distiller(build_tiny_causal_lm(tok, **STUDENT), teacher, _args())
    assert d.status(10**6) == "" and not d.mt.weighting_active(10**6)  # baseline: never weighted


def test_tokenizer_mismatch_is_refused(tok):
    other = build_tokenizer(vocab_size=512)
    with pytest.raises(SystemExit, match="share a tokenizer"):
        kv_distill.check_same_tokenizer(tok, other)


DEMO_SMALL = ["--max_steps", "4", "--teacher_sft_steps", "2", "--batch_size", "4", "--eval_size", "4",
              "--max_new_tokens", "6", "--subset_size", "64", "--logging_steps", "2",
              "--attention_weighted_kv_warmup", "2"]


def test_main_logs_recipe_tags_and_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    res = kv_distill.main(DEMO_SMALL + ["--output_dir", str(out), "--use_attention_weighted_kv"])
    text = capsys.readouterr().out
    assert "Step 1:" in text and "[Attn-warmup: 1 steps]" in text
    assert "Step 4:" in text and "[Student-Attn-weighted]" in text
    assert [r["attn_weighted"] for r in res["history"]] == [False, False, True, True]
    assert (out / "checkpoint-4" / "model.safetensors").exists() and (out / "student" / "config.json").exists()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "eval_accuracy" in rows[-1]


def test_compare_writes_table_and_plot(tmp_path):
    out = tmp_path / "cmp"
    res = kv_distill.main(DEMO_SMALL + ["--output_dir", str(out), "--compare"])
    assert [r["config"] for r in res["compare"]] == ["baseline", "+attention", "+attention+cka"]
    table = (out / "compare.md").read_text()
    assert "| baseline |" in table and "| +attention+cka |" in table
    assert (out / "loss_curves.png").stat().st_size > 1000
    assert res["compare"][2]["cka"] > 0 and res["compare"][0]["cka"] == 0


@pytest.mark.cuda
def test_cuda_bf16_step_fused_matches_eager_importance(tok):
    """GPU: Triton importance/KV loss through the trainer under bf16 autocast."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    teacher = build_tiny_causal_lm(tok, **TEACHER).to(dev).eval().requires_grad_(False)
    student = build_tiny_causal_lm(tok, **STUDENT).to(dev)
    args = _args(use_attention_weighted_kv=True, attention_weighted_kv_warmup=0, cka_weight=0.05, codi_weight=0.1)
    d, t = _distiller(student, teacher, args)
    d = d.to(dev)
    amp = amp_context(dev, True)
    b = kv_distill.encode(tok, make_arithmetic(8, seed=4), 96, dev)
    opt = torch.optim.AdamW(d.parameters(), lr=3e-3)
    losses = []
    for step in range(6):
        t_out = _targets(t, d, b, step, amp)
        with amp():
            loss, met = d(b, t_out, step)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        assert d.mt.last_weighted
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    with torch.no_grad(), amp(), KVCapture(student, [1], [1]) as cap:
        student.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    q, k = cap.qk(1)
    student.config._attn_implementation = "eager"
    with torch.no_grad(), amp():
        attn = student.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                             output_attentions=True).attentions[1]
    student.config._attn_implementation = "sdpa"
    torch.testing.assert_close(attention_token_importance(q, k, attention_mask=b["attention_mask"]),
                               attention_token_importance(attn.float(), attention_mask=b["attention_mask"]),
                               atol=2e-2, rtol=5e-2)
