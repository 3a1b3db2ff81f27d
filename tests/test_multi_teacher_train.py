"""The KV-distillation trainer with teachers lists (``latentfast-kv-distill --teachers``): ``--teacher_model``
gives the single-teacher numbers and equals a one-entry list, an offline cache trains like the online teacher,
teachers of other widths / head counts train their adapters, resume restores the router, and
the demo / --compare run end to end (tiny)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from latentfast.data import build_tokenizer
from latentfast.data.synthetic import make_two_mode_arithmetic
from latentfast.models import build_tiny_causal_lm
from latentfast.train import kv_distill
from latentfast.train.kv_distill import cache as kv_cache
from latentfast.train.kv_distill import demo, teachers
from latentfast.train.kv_distill.distiller import per_task_weight_means

STUDENT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=64)
TEACHERS = {  # other widths, depths, KV-head counts and head dims than the student and each other
    "eq": dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3,
               intermediate_size=64),
    "nl": dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=5, num_key_value_heads=5,
               intermediate_size=64),
}


@pytest.fixture(autouse=True)
def _reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the ops' references; their kernels have their own tests


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Student and teachers saved as local HF folders, two-mode training data as JSONL."""
    root = tmp_path_factory.mktemp("mt")
    tok = build_tokenizer()
    for name, shape, seed in [("student", STUDENT, 0), ("eq", TEACHERS["eq"], 1), ("nl", TEACHERS["nl"], 2)]:
        build_tiny_causal_lm(tok, seed=seed, **shape).save_pretrained(str(root / name))
        tok.save_pretrained(str(root / name))
    rows = make_two_mode_arithmetic(12, seed=5)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _yaml(path, teachers):
    lines = ["teachers:"]
    for t in teachers:
        lines.append("  - {" + ", ".join(f"{k}: {v}" for k, v in t.items()) + "}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _argv(models, out, steps=3, **kw):
    argv = ["--model_name", str(models / "student"), "--dataset_name", str(models / "train.jsonl"),
            "--output_dir", str(out), "--max_steps", str(steps), "--batch_size", "4", "--max_length", "96",
            "--eval_size", "0", "--logging_steps", "0", "--save_steps", "0", "--lr", "3e-3", "--warmup_ratio", "0"]
    for k, v in kw.items():
        argv += [f"--{k}"] if v is True else [f"--no-{k}"] if v is False else [f"--{k}", str(v)]
    return argv


def _hist(res, keys=("loss", "ce", "kv", "grad_norm")):
    return [[r[k] for k in keys] for r in res["history"]]


# --teacher_model's numbers before the two KV-distillation trainers became one (main at d76fb4e, this CPU,
# fp32, one thread): loss, ce, kv, kv_mse, cka, codi, grad_norm per step
SINGLE_TEACHER = {
    "teacher_attention_cka_codi": [
        [7.088650226593018, 6.929464817047119, 0.044921234250068665, 0.044921234250068665, 0.5153746604919434,
         0.8849532604217529, 1.6998409032821655],
        [6.9107985496521, 6.75892448425293, 0.04262104630470276, 0.043096836656332016, 0.4743974804878235,
         0.8553317785263062, 1.651821255683899],
        [6.7321038246154785, 6.588341236114502, 0.04063341021537781, 0.04139755666255951, 0.45736682415008545,
         0.8026143312454224, 1.6317322254180908]],
    "student_attention": [  # no CKA / CODI: loss, ce, kv, kv_mse, grad_norm
        [6.974386215209961, 6.929464817047119, 0.044921234250068665, 0.044921234250068665, 1.6778008937835693],
        [6.800266265869141, 6.757610321044922, 0.04265572875738144, 0.04312717169523239, 1.6304420232772827],
        [6.6276631355285645, 6.58700704574585, 0.04065588116645813, 0.04139737784862518, 1.6526247262954712]],
}


@pytest.mark.parametrize("case", list(SINGLE_TEACHER))
def test_teacher_model_gives_the_single_teacher_numbers(models, tmp_path, case):
    """``--teacher_model`` (a teachers list of one) reproduces the single-teacher trainer's losses,
    and a one-entry teachers.yaml at static weight 1 the same run."""
    extra = dict(use_attention_weighted_kv=True, attention_weighted_kv_warmup=1)
    keys = ("loss", "ce", "kv", "kv_mse", "grad_norm")
    if case == "teacher_attention_cka_codi":
        extra.update(use_teacher_attention=True, cka_weight=0.05, codi_weight=0.1)
        keys = ("loss", "ce", "kv", "kv_mse", "cka", "codi", "grad_norm")
    single = kv_distill.main(_argv(models, tmp_path / "single", teacher_model=models / "eq", **extra))
    torch.testing.assert_close(torch.tensor(_hist(single, keys)), torch.tensor(SINGLE_TEACHER[case]),
                               rtol=1e-4, atol=1e-6)
    assert [r["attn_weighted"] for r in single["history"]] == [False, True, True]
    y = _yaml(tmp_path / "t.yaml", [dict(name="eq", model=models / "eq", weight=1.0, kv_adapter="linear")])
    multi = kv_distill.main(_argv(models, tmp_path / "multi", teachers=y, teacher_weighting="static", **extra))
    assert _hist(multi, keys) == _hist(single, keys)
    assert all(r["w/eq"] == 1.0 and r["w_entropy"] == pytest.approx(0.0, abs=1e-6) for r in multi["history"])
    a = load_file(str(tmp_path / "single" / "student" / "model.safetensors"))
    b = load_file(str(tmp_path / "multi" / "student" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit):  # one teacher source at a time
        kv_distill.parse_args(["--teachers", y, "--teacher_model", str(models / "eq")])


@pytest.mark.parametrize("compress", [False, True])
def test_offline_cache_trains_like_the_online_teacher(models, tmp_path, compress):
    """Full targets with attention weighting, or KaVa R-KV compressed targets (--kv_compression rkv)."""
    cache = tmp_path / "cache"
    online = _yaml(tmp_path / "on.yaml", [dict(name="eq", model=models / "eq", kv_adapter="mlp"),
                                          dict(name="nl", model=models / "nl")])
    offline = _yaml(tmp_path / "off.yaml", [dict(name="eq", model=models / "eq", kv_adapter="mlp",
                                                 source=f"'offline:{cache}'"),
                                            dict(name="nl", model=models / "nl")])
    rkv = ["--kv_compression", "rkv", "--kv_slots", "6"] if compress else []
    kv_cache.main(["--teachers", offline, "--model_name", str(models / "student"), "--dataset_name",
                   str(models / "train.jsonl"), "--max_length", "96", "--batch_size", "5", "--cache_dtype", "float32"]
                  + rkv)
    extra = dict(teacher_weighting="confidence", use_attention_weighted_kv=not compress, use_teacher_attention=True,
                 attention_weighted_kv_warmup=1)
    if compress:
        extra.update(kv_compression="rkv", kv_slots=6)
    a = kv_distill.main(_argv(models, tmp_path / "on", teachers=online, **extra))
    b = kv_distill.main(_argv(models, tmp_path / "off", teachers=offline, **extra))
    keys = ("loss", "kv", "kv/eq", "kv/nl", "w/eq", "w/eq/eq", "w/nl/nl", "grad_norm")
    torch.testing.assert_close(torch.tensor(_hist(b, keys)), torch.tensor(_hist(a, keys)), rtol=1e-5, atol=1e-6)
    w = torch.tensor(_hist(a, ("w/eq", "w/nl")))
    torch.testing.assert_close(w.sum(1), torch.ones(3)) and not torch.allclose(w[:, 0], torch.full((3,), 0.5))


def test_other_shapes_adapters_train_and_resume_restores_the_router(models, tmp_path):
    y = _yaml(tmp_path / "t.yaml", [dict(name="eq", model=models / "eq", mode="eq", kv_adapter="mlp"),
                                    dict(name="nl", model=models / "nl", mode="nl", kv_adapter="linear")])
    kw = dict(teachers=y, teacher_weighting="learned", router_reg_weight=0.1, router_hidden=8, lr=2e-2)
    full = kv_distill.main(_argv(models, tmp_path / "full", steps=4, save_steps=2, **kw))
    c2, c4 = (load_file(str(tmp_path / "full" / f"checkpoint-{s}" / "model.safetensors")) for s in (2, 4))
    # adapters over concatenated heads: student 2x8 -> eq 3x8 (MLP + linear skip), nl 5x8 (linear)
    assert c4["mt.kv.0.projections.0.linear.k_proj.weight"].shape == (24, 16)
    assert c4["mt.kv.0.projections.0.k_mlp.0.weight"].shape == (24, 16)
    assert c4["mt.kv.1.projections.1.v_proj.weight"].shape == (40, 16)
    router = [k for k in c4 if k.startswith("mt.router.")]
    assert len(router) == 4 and c2["mt.router.net.2.weight"].abs().sum() > 0  # trained away from its zero init
    assert not torch.equal(c2["mt.router.net.2.weight"], c4["mt.router.net.2.weight"])
    assert not torch.equal(c2["mt.kv.0.projections.0.k_mlp.2.weight"], c4["mt.kv.0.projections.0.k_mlp.2.weight"])
    h = full["history"]
    assert all(abs(r["w/eq"] + r["w/nl"] - 1) < 1e-6 and 0 <= r["w_entropy"] <= 0.6932 for r in h)
    assert h[-1]["w/eq/eq"] != h[-1]["w/nl/eq"]  # per-sample weights: the two modes differ
    # resume from step 2 in a fresh folder: steps 3-4 and the final router equal the uninterrupted run
    res = kv_distill.main(_argv(models, tmp_path / "resumed", steps=4, save_steps=2,
                                resume_from_checkpoint=tmp_path / "full" / "checkpoint-2", **kw))
    assert [r["step"] for r in res["history"]] == [3, 4]
    keys = ("loss", "kv", "w/eq", "w/eq/eq", "router_reg", "grad_norm")
    torch.testing.assert_close(torch.tensor(_hist(res, keys)), torch.tensor(_hist({"history": h[2:]}, keys)))
    r4 = load_file(str(tmp_path / "resumed" / "checkpoint-4" / "model.safetensors"))
    for k in router + ["mt.kv.0.projections.0.k_mlp.2.weight"]:
        torch.testing.assert_close(r4[k], c4[k])


def test_router_signal_trains_the_router_from_tags_or_answer_nll(models, tmp_path):
    """--router_signal tag / answer_nll: the learned router trains from the samples' mode tags
    (through the per_task table) or from the teachers' answer NLLs instead of the KV losses
    (its gradient is checked exactly in test_multi_teacher.py); here it runs in the trainer and
    moves the weights off uniform. (On these tiny models it moves every sample alike: the mean-
    pooled hidden state does not separate the modes in a few steps.)"""
    y = _yaml(tmp_path / "t.yaml", [dict(name="eq", model=models / "eq", mode="eq"),
                                    dict(name="nl", model=models / "nl", mode="nl")])
    kw = dict(teachers=y, teacher_weighting="learned", router_reg_weight=0.0, lr=5e-2)
    for signal in ("tag", "answer_nll"):
        h = kv_distill.main(_argv(models, tmp_path / signal, steps=3, router_signal=signal, **kw))["history"]
        assert h[0]["w/eq"] == pytest.approx(0.5)  # zero-initialised router: uniform at the first step
        assert all(abs(r["w/eq"] + r["w/nl"] - 1) < 1e-6 for r in h) and abs(h[-1]["w/eq"] - 0.5) > 0.01


def test_per_task_weight_means_from_sums():
    row = {"_wsum/eq/a": 3.0, "_wsum/eq/b": 1.0, "_n/eq": 4.0, "_wsum/nl/a": 0.0, "_n/nl": 0.0, "loss": 1.0}
    per_task_weight_means(row)
    assert row == {"w/eq/a": 0.75, "w/eq/b": 0.25, "loss": 1.0}


def test_multi_teacher_demo_compare_smoke(models, tmp_path, monkeypatch):
    """--multi_teacher_demo --compare with smaller models: the teachers' warm-up on their own
    mode, eight students (the teachers' targets computed once per step for all of them, the
    same as a run on its own), table, JSON, plot."""
    monkeypatch.setattr(demo, "DEMO_TEACHERS", TEACHERS)
    calls = []
    real = teachers.teacher_targets
    monkeypatch.setattr(teachers, "teacher_targets", lambda *a, **k: calls.append(1) or real(*a, **k))
    small = ["--model_name", str(models / "student"), "--max_steps", "2", "--teacher_sft_steps", "1",
             "--batch_size", "2", "--eval_size", "4", "--max_new_tokens", "2", "--subset_size", "16",
             "--logging_steps", "1"]
    res = kv_distill.main(["--multi_teacher_demo", "--compare", "--output_dir", str(tmp_path)] + small)
    assert len(calls) == 2 * 2  # two teachers x two steps, not once per run
    names = [r["config"] for r in res["compare"]]
    assert names == ["only eq", "only nl", "static", "per_task", "confidence", "entropy", "min_ce", "learned"]
    alone = kv_distill.main(["--multi_teacher_demo", "--teacher_weighting", "entropy", "--output_dir",
                             str(tmp_path / "alone")] + small)
    rows = [json.loads(x) for x in (tmp_path / "entropy" / "metrics.jsonl").read_text().splitlines()]
    keys = ("loss", "kv", "w/eq", "w/nl/eq", "grad_norm")
    assert [[r[k] for k in keys] for r in rows if "loss" in r] == _hist(alone, keys)
    by = {r["config"]: r for r in res["compare"]}
    assert by["per_task"]["w/eq/eq"] == 1.0 and by["per_task"]["w/nl/nl"] == 1.0  # each mode to its teacher
    assert by["static"]["w/eq/eq"] == 0.5 and "w/eq/nl" not in by["only eq"] and by["only eq"]["w/eq"] == 1.0
    assert {"kv/eq", "kv/nl", "w_entropy", "step_ms", "eval_accuracy/eq", "eval_accuracy/nl"} <= set(by["learned"])
    table = (tmp_path / "compare.md").read_text()
    assert "| teacher eq |" in table and "| only eq |" in table and "acc [nl]" in table
    assert table.count("\n") == 2 + 2 + 8  # header, the two teachers, eight students
    assert by["min_ce"]["w_entropy"] == pytest.approx(0.0, abs=1e-6) and 0 < by["entropy"]["w_entropy"]
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert [r["config"] for r in saved] == ["teacher eq", "teacher nl"] + names
    assert (tmp_path / "routing_weights.png").stat().st_size > 1000
    rows = [json.loads(x) for x in (tmp_path / "learned" / "metrics.jsonl").read_text().splitlines()]
    assert {"w/eq", "w/nl", "w/eq/eq", "w/nl/eq", "w_entropy", "router_reg"} <= set(rows[0])
