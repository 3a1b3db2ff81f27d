"""MiniMind LoRA, reasoning distillation and distillation stages: the loss falls on a tiny
config, LoRA trains and saves only its weights (MiniMind names), the reasoning weights hit
whole tag sequences only, the distillation loss equals a plain alpha*CE + (1-alpha)*T^2*KL
(values and gradients), and the stages chain by --from_weight."""
import pathlib

import re

import pytest
import torch
import torch.nn.functional as F

from latentfast.data import minimind as mmdata
from latentfast.models.minimind import MiniMindConfig, MiniMindForCausalLM, load_tokenizer
from latentfast.train.minimind import cli as mm_cli
from latentfast.train.minimind.distill_reason import DistillReason, DistillReasonArgs
from latentfast.train.minimind.distillation import Distillation, DistillationArgs, DistillLoss
from latentfast.train.minimind.full_sft import FullSFT, FullSFTArgs
from latentfast.train.minimind.lora import LoRA, LoRAArgs, load_lora, square_linears, with_lora


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _native_cpu_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the engine's CPU path (its kernels have their own tests)


TINY = dict(hidden_size=32, num_hidden_layers=1, max_seq_len=128, batch_size=4, accumulation_steps=1,
            log_interval=0, save_interval=0, max_steps=10, dtype="float32", device="cpu", data_path="demo", lr=2e-2)


def _cfg(cls, root, **kw):
    return cls.from_dict({**TINY, "save_dir": str(root / "out"), **kw})


def _rows(kind, n=4):
    """A fixed handful of demo rows: every step sees the same examples, so the loss falls step to step."""
    return [r["conversations"] for r in mmdata.gsm8k_rows(kind, "train", n)]


def _falls(res, by=0.2):
    loss = [r["loss"] for r in res["history"]]
    assert sum(loss[-2:]) / 2 < sum(loss[:2]) / 2 - by, loss


@pytest.fixture(scope="module")
def sft_root(tmp_path_factory):
    """out/full_sft_32.pth from a short full_sft (random start), for the stages that chain from it."""
    root = tmp_path_factory.mktemp("chain")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        FullSFT(_cfg(FullSFTArgs, root, from_weight="none", max_steps=3)).fit()
    assert (root / "out" / "full_sft_32.pth").is_file()
    return root


# ----------------------------------------------------------------------------- LoRA
def test_lora_trains_only_adapters_and_saves_minimind_names(sft_root):
    cfg = _cfg(LoRAArgs, sft_root, save_dir=str(sft_root / "out" / "lora"), lr=1e-2)
    assert LoRAArgs.parse([]).lora_name == "lora_identity" and LoRAArgs.parse([]).save_dir == "../out/lora"
    tr = LoRA(cfg, rows=_rows("sft"))
    res = tr.fit()
    _falls(res, 0.1)
    path = sft_root / "out" / "lora" / "lora_identity_32.pth"
    assert res["weights"] == str(path)
    sd = torch.load(path, weights_only=True)
    assert set(sd) == {f"model.layers.0.self_attn.{m}.lora.{p}.weight" for m in ("q_proj", "o_proj") for p in "AB"}
    assert sd["model.layers.0.self_attn.q_proj.lora.A.weight"].shape == (8, 32)
    base = torch.load(sft_root / "out" / "full_sft_32.pth", weights_only=True)
    trained = {k.replace("base_layer.", ""): v for k, v in tr.lm.get_base_model().state_dict().items() if "lora" not in k}
    assert all(torch.equal(trained[k].half(), base[k]) for k in base)  # the base is frozen
    fresh = with_lora(MiniMindForCausalLM(MiniMindConfig(hidden_size=32, num_hidden_layers=1)), 8)
    load_lora(fresh, path)
    b = fresh.get_base_model().model.layers[0].self_attn.o_proj.lora_B["default"].weight
    assert torch.equal(b.half(), sd["model.layers.0.self_attn.o_proj.lora.B.weight"]) and b.abs().sum() > 0


def test_lora_skips_the_gated_q_proj():
    m = MiniMindForCausalLM(MiniMindConfig(hidden_size=32, num_hidden_layers=1, headwise_attn_output_gate=True))
    assert square_linears(m) == ["model.layers.0.self_attn.o_proj"]  # q_proj 32 -> 36: not square


# ----------------------------------------------------------------------------- reasoning
def test_tag_weights_hit_whole_tag_sequences_only():
    tok = load_tokenizer()
    conv = [{"role": "user", "content": "is 3 < 4 > 2?"},
            {"role": "assistant", "content": "<think>\n3<4 and 4>2, I think\n</think>\n<answer>\nyes\n</answer>"}]
    b = mmdata.encode_sft(tok, [conv], 96)
    ids = mmdata.tag_token_ids(tok)
    w = mmdata.tag_weights(b["Y"], b["loss_mask"], ids, 10.0)
    hit = (w == 10).nonzero()[:, 1].tolist()
    want = []
    Y = b["Y"][0].tolist()
    for seq in ids:
        for s in range(len(Y) - len(seq) + 1):
            if Y[s:s + len(seq)] == seq and b["loss_mask"][0, s]:
                want += range(s, s + len(seq))
    assert sorted(hit) == sorted(want) and len(hit) == sum(len(s) for s in ids)  # each tag once, all its pieces
    stray = mmdata.minimind_tag_weights(b["Y"], b["loss_mask"], ids, 10.0)
    assert (stray == 10).sum() > len(hit)  # MiniMind's isin rule also hits the stray < and > pieces
    assert torch.equal(w == 0, b["loss_mask"] == 0)


def test_distill_reason_loss_is_weighted_ce_and_falls(sft_root):
    cfg = _cfg(DistillReasonArgs, sft_root, from_weight="full_sft")
    tr = DistillReason(cfg)
    tr.device, tr.rank, tr.world = torch.device("cpu"), 0, 1
    tr.setup()
    tr.model = tr.build_model()
    b = tr.batches(0)[0]
    assert (b["weights"] == 10).any()
    loss, met = tr.loss(b)
    logits = tr.lm(input_ids=b["X"]).logits.float()
    ce = F.cross_entropy(logits.flatten(0, 1), b["Y"].flatten(), reduction="none")
    ref = (ce * b["weights"].flatten()).sum() / b["loss_mask"].sum()
    torch.testing.assert_close(met["ce"], ref, rtol=1e-5, atol=1e-5)
    _falls(DistillReason(cfg, rows=_rows("reason")).fit())
    assert (sft_root / "out" / "reason_32.pth").is_file()


# ----------------------------------------------------------------------------- distillation
@pytest.mark.parametrize("alpha,T", [(0.5, 1.5), (0.2, 2.0)])
def test_distillation_loss_equals_plain_reference(alpha, T):
    torch.manual_seed(0)
    student = MiniMindForCausalLM(MiniMindConfig(hidden_size=32, num_hidden_layers=1))
    teacher = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2)).eval()
    X = torch.randint(3, 6400, (2, 12))
    Y = torch.randint(3, 6400, (2, 12))
    mask = (torch.rand(2, 12) > 0.3).long()
    with torch.no_grad():
        th = teacher.model(input_ids=X).last_hidden_state
    loss, kd, ce, _ = DistillLoss(student, alpha, T)(X, Y, mask, th, teacher.lm_head.weight)
    loss.backward()
    got = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    # MiniMind's train_distillation.py, written out on full logits
    s = student(input_ids=X).logits.flatten(0, 1)
    with torch.no_grad():
        t = teacher(input_ids=X).logits.flatten(0, 1)
    m = mask.flatten().bool()
    ce_ref = (F.cross_entropy(s, Y.flatten(), reduction="none") * m).sum() / m.sum()
    kl = F.kl_div(F.log_softmax(s[m] / T, -1), F.softmax(t[m] / T, -1), reduction="batchmean") * T * T
    ref = alpha * ce_ref + (1 - alpha) * kl
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kd, kl.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce, ce_ref.detach(), rtol=1e-5, atol=1e-5)
    for n, p in student.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_distillation_student_learns_from_a_larger_teacher(sft_root):
    args = DistillationArgs.parse(["--student_hidden_size", "16", "--student_num_layers", "1",
                                   "--from_student_weight", "none", "--teacher_hidden_size", "32"])
    assert (args.hidden_size, args.num_hidden_layers, args.from_weight, args.teacher_hidden_size) == (16, 1, "none", 32)
    assert (DistillationArgs.parse([]).alpha, DistillationArgs.parse([]).temperature) == (0.5, 1.5)
    cfg = _cfg(DistillationArgs, sft_root, hidden_size=16, from_weight="none", teacher_hidden_size=32,
               teacher_num_layers=1, from_teacher_weight="full_sft")
    res = Distillation(cfg, rows=_rows("sft")).fit()
    _falls(res)
    assert all(r["kd"] > 0 for r in res["history"])
    assert (sft_root / "out" / "full_dist_16.pth").is_file()


def test_distillation_missing_teacher_names_the_file(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    with pytest.raises(SystemExit) as e:  # an argparse error (exit 2), before anything is built
        mm_cli.main(["distillation", "--data_path", str(data), "--save_dir", str(tmp_path), "--from_student_weight",
                     "none"])
    assert e.value.code == 2
    assert re.search(r"--from_teacher_weight full_sft: no such file .*full_sft_768\.pth", capsys.readouterr().err)
