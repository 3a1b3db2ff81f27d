"""teachers.yaml parsing and its errors, the multi-teacher loss (one teacher with weight 1 is
the single-teacher loss), and the offline cache round trip (same loss as online, full and
compressed targets)."""
import pytest
import torch

from latentfast.data import build_tokenizer, make_arithmetic
from latentfast.data.kv_cache import KVCacheReader
from latentfast.hf.capture import KVCapture
from latentfast.models import build_tiny_causal_lm
from latentfast.nn import AttentionWeightedKVLoss
from latentfast.nn.kv_adapter import kv_adapters
from latentfast.nn.multi_teacher_kv import MultiTeacherKVLoss
from latentfast.train import kv_distill
from latentfast.train.kv_distill import cache as kv_cache
from latentfast.train.kv_distill.spec import TeachersConfigError, load_teachers, parse_teachers, save_teachers
from latentfast.train.kv_distill.teachers import Compression, load_teachers_from_config

STUDENT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=64)
TEACHER = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3,
               intermediate_size=64)


@pytest.fixture(autouse=True)
def _reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the ops' references; their kernels have their own tests


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_parse_teachers_and_task_table(tmp_path):
    p = tmp_path / "teachers.yaml"
    p.write_text("""
teachers:
  - {name: eq, model: /m/eq, mode: eq, tasks: [arith], kv_adapter: mlp, weight: 3}
  - name: nl
    model: /m/nl
    mode: nl
    layer_map: [[0, 1], [-1, -1]]
    source: offline:/cache/nl
    dtype: bfloat16
""")
    cfg = load_teachers(p)
    assert cfg.names == ["eq", "nl"] and cfg.teachers[0].kv_adapter == "mlp"
    assert cfg.teachers[1].offline_dir == "/cache/nl" and cfg.teachers[0].offline_dir is None
    assert cfg.teachers[1].layer_map == [[0, 1], [-1, -1]] and cfg.teachers[0].tags == ("eq", "arith")
    assert cfg.task_table() == {"default": [3.0, 1.0], "arith": [1.0, 0.0], "eq": [1.0, 0.0], "nl": [0.0, 1.0]}
    assert cfg.teachers[1].torch_dtype("cpu") == torch.bfloat16 and cfg.teachers[0].torch_dtype("cpu") == torch.float32
    save_teachers(cfg, tmp_path / "again.yaml")
    assert load_teachers(tmp_path / "again.yaml") == cfg
    cfg2 = parse_teachers({"teachers": [{"model": "a", "name": "a"}, {"model": "b", "name": "b"}],
                           "per_task": {"x": {"b": 2.0}}})
    assert cfg2.task_table()["x"] == [0.0, 2.0]
    assert parse_teachers([{"model": "a"}]).names == ["teacher0"]


@pytest.mark.parametrize("raw,match", [
    ({"teachers": [{"model": "a", "kv_adapter": "conv"}]}, r"teachers\[0\]\.kv_adapter: expected one of"),
    ({"teachers": [{"model": "a", "source": "offline:"}]}, r"teachers\[0\]\.source: expected 'online' or"),
    ({"teachers": [{"model": "a", "layer_map": "depth"}]}, r"teachers\[0\]\.layer_map"),
    ({"teachers": [{"model": "a", "layer_map": [[0, 1, 2]]}]}, r"teachers\[0\]\.layer_map"),
    ({"teachers": [{"model": "a", "dtype": "int8"}]}, r"teachers\[0\]\.dtype"),
    ({"teachers": [{"model": "a", "weight": -1}]}, r"teachers\[0\]\.weight"),
    ({"teachers": [{"model": "a", "colour": 1}]}, r"teachers\[0\]: unknown field\(s\) \['colour'\]"),
    ({"teachers": [{"name": "x"}]}, r"teachers\[0\]\.model: expected a local model path"),
    ({"teachers": [{"model": "a", "name": "x"}, {"model": "b", "name": "x"}]}, "duplicate teacher name"),
    ({"teachers": []}, "non-empty list"),
    ({"teacher": []}, "unknown top-level key"),
    ({"teachers": [{"model": "a", "name": "a"}], "per_task": {"eq": {"b": 1}}}, r"per_task\.eq: unknown teacher"),
])
def test_parse_errors_name_the_field(raw, match):
    with pytest.raises(TeachersConfigError, match=match):
        parse_teachers(raw, "t.yaml")


def test_load_errors(tmp_path):
    with pytest.raises(TeachersConfigError, match="no such file"):
        load_teachers(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("teachers: [model: a\n")
    with pytest.raises(TeachersConfigError, match="not valid YAML"):
        load_teachers(tmp_path / "bad.yaml")


def _student_kv(lm, batch, layers):
    with KVCapture(lm, layers) as cap:
        lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return {s: cap.kv(s) for s in layers}


def test_one_teacher_weight_one_is_single_teacher_loss(tok):
    torch.manual_seed(0)
    student = build_tiny_causal_lm(tok, **STUDENT)
    teacher = build_tiny_causal_lm(tok, seed=1, **TEACHER).eval()
    b = kv_distill.encode(tok, make_arithmetic(3, seed=0), 96, torch.device("cpu"))
    pairs = [(0, 1), (1, 2)]
    adapters = kv_adapters("linear", pairs, student.config, teacher.config)
    single = AttentionWeightedKVLoss(0, True, adapters)
    mt = MultiTeacherKVLoss([pairs], [adapters], ["t"], "static", [1.0], warmup_steps=0, use_teacher_attention=True)
    assert mt.kv[0].projections[0] is single.projections[0]  # the same adapter modules
    s_kv = _student_kv(student, b, [0, 1])
    with KVCapture(teacher, [1, 2], [2]) as cap, torch.no_grad():
        teacher.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    from latentfast.ops import attention_token_importance

    imp = attention_token_importance(*cap.qk(2), attention_mask=b["attention_mask"])
    t_kv = [cap.kv(1), cap.kv(2)]
    exp = single([s_kv[0], s_kv[1]], t_kv, step=3, teacher_importance=imp, attention_mask=b["attention_mask"])
    w = mt.weights(batch_size=3)
    got, reg, met = mt(s_kv, [{"kv": t_kv, "importance": imp}], w, step=3, attention_mask=b["attention_mask"],
                       tags=["eq", "eq", "nl"])
    assert torch.equal(got, exp) and float(reg) == 0.0
    assert float(met["w/t"]) == 1.0 and float(met["w/eq/t"]) == 1.0
    torch.testing.assert_close(met["kv/t"], exp.detach())
    ga = torch.autograd.grad(got, list(student.parameters()), retain_graph=True, allow_unused=True)
    gb = torch.autograd.grad(exp, list(student.parameters()), allow_unused=True)
    for x, y in zip(ga, gb):
        assert (x is None and y is None) or torch.equal(x, y)


def _save_teacher(tok, path, seed=1):
    lm = build_tiny_causal_lm(tok, seed=seed, **TEACHER)
    lm.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return lm


@pytest.mark.parametrize("compress", [False, True])
def test_offline_cache_round_trip_same_loss(tok, tmp_path, compress):
    rows = make_arithmetic(10, seed=3)
    data = tmp_path / "train.jsonl"
    import json

    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _save_teacher(tok, tmp_path / "teacher")
    cache = tmp_path / "cache"
    yaml_path = tmp_path / "teachers.yaml"
    yaml_path.write_text(f"teachers:\n  - {{name: t, model: {tmp_path / 'teacher'}, source: 'offline:{cache}'}}\n")
    argv = ["--teachers", str(yaml_path), "--student_layers", "2", "--dataset_name", str(data), "--batch_size", "4",
            "--max_length", "96", "--cache_dtype", "float32", "--shard_size", "3"]
    if compress:
        argv += ["--kv_compression", "rkv", "--kv_slots", "5"]
    res = kv_cache.main(argv)
    assert res["t"]["rows"] == 10 and len(list(cache.glob("shard-*.safetensors"))) == 4

    student = build_tiny_causal_lm(tok, **STUDENT)
    comp = Compression(5, 0.1) if compress else None
    offline = load_teachers(yaml_path)
    online = parse_teachers({"teachers": [{"name": "t", "model": str(tmp_path / "teacher")}]})
    (t_off,) = load_teachers_from_config(offline, student.config, tok, compression=comp, need_importance=True,
                                         need_stats=True)
    (t_on,) = load_teachers_from_config(online, student.config, tok, compression=comp)
    assert t_off.reader is not None and t_on.model is not None and t_off.pairs == t_on.pairs == [(0, 1), (1, 2)]
    ids = [7, 2, 9]  # another batch composition (and padded length) than the cache was written with
    b = kv_distill.encode(tok, [rows[i] for i in ids], 96, torch.device("cpu"))
    b["row_ids"] = ids
    a_on = t_on.targets(b, need_importance=True, stats=True)
    a_off = t_off.targets(b, need_importance=True, stats=True)
    adapters = kv_adapters("linear", t_on.pairs, student.config, t_on.config)
    mt = MultiTeacherKVLoss([t_on.pairs], [adapters], ["t"], "confidence", warmup_steps=0,
                            use_teacher_attention=True)
    s_kv = _student_kv(student, b, [0, 1])
    w_on = mt.weights(batch_size=3, nll=a_on["nll"][:, None])
    w_off = mt.weights(batch_size=3, nll=a_off["nll"][:, None])
    l_on = mt(s_kv, [a_on], w_on, step=1, attention_mask=b["attention_mask"])[0]
    l_off = mt(s_kv, [a_off], w_off, step=1, attention_mask=b["attention_mask"])[0]
    torch.testing.assert_close(l_off, l_on, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a_off["nll"], a_on["nll"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a_off["importance"], a_on["importance"], atol=1e-6, rtol=1e-5)
    if compress:
        assert a_on["kv"] is None and torch.equal(a_off["rkv"][0]["index"], a_on["rkv"][0]["index"])
    # a cache from other data fails loudly
    bad = kv_distill.encode(tok, [rows[0]], 96, torch.device("cpu"))
    bad["row_ids"] = [1]
    with pytest.raises(ValueError, match="tokens differ"):
        t_off.targets(bad, need_importance=False, stats=False)
    with pytest.raises(ValueError, match="teacher layers"):
        KVCacheReader(cache).check([0])
    with pytest.raises(ValueError, match="kv_compression"):
        load_teachers_from_config(offline, student.config, tok, compression=None if compress else Compression())


def test_router_gradient_is_scale_normalised_per_teacher():
    """Two teachers whose per-sample KV losses differ by a constant factor c: the router's
    gradient (d/dw_bk = L_bk / scale_k, scale_k the running mean of teacher k's loss) is zero,
    where the raw d/dw_bk = L_bk would push every sample to the smaller-loss teacher. A
    per-sample preference beyond the scale still moves the router; the loss value and the
    student's gradient are the plain sum_b sum_k w_bk L_bk's."""
    from latentfast.nn.kv_adapter import IdentityKVAdapter
    from latentfast.reference.kv_loss import kv_loss_per_sample  # plain, differentiable

    torch.manual_seed(0)
    B, H, T, d, c = 4, 2, 5, 8, 9.0
    s_k, s_v = torch.randn(B, H, T, d, requires_grad=True), torch.randn(B, H, T, d, requires_grad=True)
    dk, dv = torch.randn(B, H, T, d), torch.randn(B, H, T, d)
    base = (s_k.detach() + dk, s_v.detach() + dv)
    scaled = (s_k.detach() + c ** 0.5 * dk, s_v.detach() + c ** 0.5 * dv)  # per-sample MSE exactly c times
    hidden = torch.randn(B, T, 6)

    def make():
        mt = MultiTeacherKVLoss([[(0, 0)], [(0, 0)]], [[IdentityKVAdapter(H, d, H, d)]] * 2, ["a", "b"], "learned",
                                router_hidden_size=6, warmup_steps=10**9)
        torch.nn.init.normal_(mt.router.net[-1].weight, std=0.3)  # non-uniform weights
        return mt

    def run(mt, targets):
        w = mt.weights(batch_size=B, hidden=hidden)
        loss, _, _ = mt({0: (s_k, s_v)}, [{"kv": [t]} for t in targets], w, step=0)
        return loss, w

    mt = make()
    loss, w = run(mt, [base, scaled])
    per = torch.stack([kv_loss_per_sample(s_k, s_v, *t) for t in (base, scaled)], 1)  # (B, 2), plain
    torch.testing.assert_close(per[:, 1], c * per[:, 0])
    torch.testing.assert_close(loss, (w * per).sum())  # value unchanged
    torch.testing.assert_close(mt.router_loss_scale, per.detach().sum(0))  # first batch: its own level
    g_router = torch.autograd.grad(loss, [mt.router.net[-1].weight, mt.router.net[-1].bias], retain_graph=True)
    assert all(float(g.abs().max()) < 1e-6 for g in g_router)  # no preference from scale alone
    g_student = torch.autograd.grad(loss, [s_k, s_v])
    g_plain = torch.autograd.grad((w.detach() * per).sum(), [s_k, s_v])
    for a, b in zip(g_student, g_plain):
        torch.testing.assert_close(a, b)
    # the unnormalised gradient (what the router had before) prefers the smaller teacher: d/dbias = w*(L - sum w L)
    raw = torch.autograd.grad((w * per.detach()).sum(), mt.router.net[-1].bias)[0]
    assert raw[0] < 0 < raw[1]  # descent raises teacher a's logit

    # a second step: the scale is an EMA, and a relative preference per sample still moves the router
    prev = mt.router_loss_scale.clone()
    fav = scaled[0].clone(), scaled[1].clone()
    fav[0][0], fav[1][0] = s_k.detach()[0] + dk[0], s_v.detach()[0] + dv[0]  # sample 0: b as close as a
    loss, w = run(mt, [base, fav])
    per = torch.stack([kv_loss_per_sample(s_k, s_v, *t) for t in (base, fav)], 1)
    torch.testing.assert_close(mt.router_loss_scale, 0.9 * prev + 0.1 * per.sum(0))
    g_logit = torch.autograd.grad(loss, w)[0]  # d loss / d w_bk = L_bk / scale_k
    torch.testing.assert_close(g_logit, per / mt.router_loss_scale)
    assert g_logit[0, 1] < g_logit[0, 0] and (g_logit[1:, 1] > g_logit[1:, 0]).all()  # sample 0 now prefers b


@pytest.mark.parametrize("signal", ["answer_nll", "tag"])
def test_router_signal_answer_nll_or_tag(signal):
    """``router_signal``: the learned router's gradient reads each teacher's answer NLL, or the
    sample's tag through the per_task table, instead of the KV losses: d loss / d w_bk = cost_bk;
    the loss value and the student's gradients stay the plain sum_b sum_k w_bk L_bk's."""
    from latentfast.nn.kv_adapter import IdentityKVAdapter
    from latentfast.nn.teacher_weighting import router_cost
    from latentfast.reference.kv_loss import kv_loss_per_sample

    torch.manual_seed(0)
    B, H, T, d = 4, 2, 5, 8
    s_k, s_v = torch.randn(B, H, T, d, requires_grad=True), torch.randn(B, H, T, d, requires_grad=True)
    targets = [(s_k.detach() + torch.randn(B, H, T, d), s_v.detach() + torch.randn(B, H, T, d)) for _ in range(2)]
    table = {"default": [1.0, 1.0], "eq": [1.0, 0.0], "nl": [0.0, 1.0]}
    mt = MultiTeacherKVLoss([[(0, 0)], [(0, 0)]], [[IdentityKVAdapter(H, d, H, d)]] * 2, ["eq", "nl"], "learned",
                            task_table=table, router_hidden_size=6, warmup_steps=10**9, router_signal=signal)
    nll = torch.tensor([[0.5, 2.0], [3.0, 0.1], [1.0, 1.0], [0.2, 0.4]])
    tags = ["eq", "nl", None, "nl"]
    assert mt.needs_stats == (signal == "answer_nll")
    cost = router_cost(signal, nll=nll, tags=tags, table=table, num_teachers=2)
    expected = nll if signal == "answer_nll" else torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [1.0, 0.0]])
    torch.testing.assert_close(cost, expected)
    w = mt.weights(batch_size=B, hidden=torch.randn(B, T, 6))
    loss, _, _ = mt({0: (s_k, s_v)}, [{"kv": [t]} for t in targets], w, step=0, router_cost=cost)
    per = torch.stack([kv_loss_per_sample(s_k, s_v, *t) for t in targets], 1)
    torch.testing.assert_close(loss, (w * per).sum())  # value unchanged
    torch.testing.assert_close(torch.autograd.grad(loss, w, retain_graph=True)[0], cost)
    for a, b in zip(torch.autograd.grad(loss, [s_k, s_v]), torch.autograd.grad((w.detach() * per).sum(), [s_k, s_v])):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="router_signal 'tag' needs"):
        router_cost("tag", tags=[None] * B, table=table, num_teachers=2)
    with pytest.raises(ValueError, match="router_signal must be one of"):
        MultiTeacherKVLoss([[(0, 0)]], [[IdentityKVAdapter(H, d, H, d)]], ["a"], router_signal="logits")
