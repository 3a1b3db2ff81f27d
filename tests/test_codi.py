"""CODI hybrid model, phase-1 data and trainer on tiny models."""
import json
import random

import pytest
import torch

from latentfast.data import build_tokenizer, make_arithmetic
from latentfast.models import build_tiny_causal_lm
from latentfast.models.codi import (LATENT, CODIModel, collate, encode_example, load_weights, new_cache,
                                    prepare_tokenizer, split_answer, split_batch)
from latentfast.nn.codi import CODIObjective
from latentfast.train import codi_data

SMALL = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128)


@pytest.fixture(scope="module")
def tok():
    return prepare_tokenizer(build_tokenizer())


def make_model(tok, num_latent=3, **kw):
    torch.manual_seed(0)
    lm = build_tiny_causal_lm(tok, **SMALL)
    return CODIModel(lm, tok.bot_token_id, tok.eot_token_id, num_latent=num_latent, prj_dim=32, **kw)


def codi_loss(m, batch, idx, **kw):
    """(loss, metrics): the trainer's loss hook, CODIObjective on the model's hidden states."""
    return CODIObjective(**kw)(m(batch, idx), batch, m.head)


def examples(tok, n=4, num_latent=3, seed=0, latent_prob=0.5):
    rng = random.Random(seed)
    out = []
    for r in make_arithmetic(n, seed=seed, min_steps=1, max_steps=3):
        steps, final = split_answer(r["answer"])
        out.append(encode_example(tok, r["question"], steps, final, [rng.random() < latent_prob for _ in steps],
                                  num_latent))
    return out


def test_split_and_encode(tok):
    steps, final = split_answer("3+4=7\n7*2=14\n#### 14")
    assert steps == ["3+4=7", "7*2=14"] and final == "14"
    with pytest.raises(ValueError, match="####"):
        split_answer("no marker")
    e = encode_example(tok, "Tom has 3 apples.", steps, final, [True, False], num_latent=4)
    ids = e["student_ids"]
    assert ids.count(LATENT) == 4 and ids.count(tok.bot_token_id) == 1 and ids.count(tok.eot_token_id) == 1
    assert ids[ids.index(tok.bot_token_id) + 5] == tok.eot_token_id
    # the distillation position is the answer marker in both sequences, and what follows is the answer
    for side in ("teacher", "student"):
        seq, pos = e[f"{side}_ids"], e[f"{side}_distill"]
        assert seq[pos] == tok.answer_marker_id
        assert tok.decode(seq[pos + 1:], skip_special_tokens=True).strip() == "14"
    # latent block, <bot>, <eot> and the prompt carry no label; the explicit step and answer do
    lab = e["student_labels"]
    assert not any(l for t, l in zip(ids, lab) if t in (LATENT, tok.bot_token_id, tok.eot_token_id))
    assert sum(lab) == len(tok("7*2=14\n", add_special_tokens=False)["input_ids"]) + len(seq) - pos - 1 + 1
    spans = e["teacher_step_spans"]
    assert len(spans) == 2 and tok.decode(e["teacher_ids"][spans[1][0]:spans[1][1]]) == "7*2=14\n"


def test_layout_forward_equals_per_sample_forward(tok):
    """Holes in the batched segment layout change nothing: each row == its own sequential pass."""
    m = make_model(tok).eval()
    exs = examples(tok, n=4, seed=3, latent_prob=0.6)
    batch = collate(exs, tok.pad_token_id)
    assert any(k for *_, k in batch["segments"])
    with torch.no_grad():
        hs = m.student_forward(batch)
        for i, e in enumerate(exs):
            cache, last, ref = new_cache(m.config), None, []
            for t, tid in enumerate(e["student_ids"]):
                emb = m.latent_embed(last)[:, None] if tid == LATENT else m.embed(torch.tensor([[tid]]))
                o = m.run(emb, torch.ones(1, t + 1, dtype=torch.long), torch.tensor([[t]]), cache=cache,
                          hidden_states=True)
                last = o.last_hidden_state[:, -1]
                ref.append(o.hidden_states[-1][0, -1])
            cols = batch["student_valid"][i].nonzero().squeeze(1)
            torch.testing.assert_close(hs[-1][i, cols], torch.stack(ref), atol=1e-4, rtol=1e-4)
            assert batch["student_valid"][i, batch["student_distill"][i]] == 1


def test_distill_zero_when_student_is_teacher(tok):
    """No latent step: the student sequence is the teacher's, so CODI distill = 0 and CE = ref CE."""
    m = make_model(tok)
    exs = examples(tok, n=3, latent_prob=0.0)
    batch, idx = split_batch(exs, [False] * 3, tok.pad_token_id)
    loss, met = codi_loss(m, batch, idx)
    assert float(met["distill"]) == pytest.approx(0.0, abs=1e-6)
    assert float(met["ce"]) == pytest.approx(float(met["ref_ce"]), rel=1e-5)


def test_cot_only_rows_skip_the_student(tok):
    m = make_model(tok)
    exs = examples(tok, n=4, latent_prob=1.0)
    batch, idx = split_batch(exs, [True, False, True, False], tok.pad_token_id)
    assert idx.tolist() == [1, 3] and batch["student_ids"].shape[0] == 2
    loss, met = codi_loss(m, batch, idx)
    assert {"ce", "distill", "ref_ce"} <= set(met)
    batch, idx = split_batch(exs, [True] * 4, tok.pad_token_id)
    loss, met = codi_loss(m, batch, idx)
    assert set(met) == {"ref_ce", "loss"}
    loss.backward()  # prj still gets a (zero) gradient: DDP needs every parameter used
    assert all(p.grad is not None for p in m.prj.parameters())


def test_a_few_steps_decrease_the_loss(tok):
    m = make_model(tok)
    batch, idx = split_batch(examples(tok, n=8, seed=1, latent_prob=0.5), [False] * 8, tok.pad_token_id)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss, met = codi_loss(m, batch, idx)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_phase1_entropy_and_hybrid_mix(tok):
    lm = build_tiny_causal_lm(tok, **SMALL)
    rows = make_arithmetic(40, seed=5, min_steps=1, max_steps=3)
    ents = codi_data.step_entropies(lm, tok, rows, batch_size=16, progress=False)
    assert [len(e) for e in ents] == [len(split_answer(r["answer"])[0]) for r in rows]
    assert all(h > 0 for e in ents for h in e)
    # scripted entropies: low ones go latent in 'entropy' samples
    fake = [[0.1, 5.0, 0.2][:len(e)] for e in ents]
    hyb = codi_data.make_hybrid(rows, fake, entropy_quantile=0.5, random_ratio=0.0)
    for s, h in zip(hyb, fake):
        assert s["type"] == "entropy" and s["latent"] == [x < 0.2 for x in h]
    mix = codi_data.make_hybrid(rows * 10, ents * 10, random_ratio=0.375, seed=1)
    share = sum(s["type"] == "random" for s in mix) / len(mix)
    assert 0.25 < share < 0.5
    assert codi_data.summary(mix)["samples"] == 400


def test_load_weights_accepts_codi_key_layout(tok, tmp_path):
    src = make_model(tok)
    with torch.no_grad():
        src.prj[1].weight.add_(1.0)
    # an original CODI checkpoint saved from a PEFT model: codi.base_model.model.<hf keys>
    sd = {k.replace("codi.", "codi.base_model.model.", 1) if k.startswith("codi.") else k: v
          for k, v in src.state_dict().items()}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    dst = make_model(tok)
    res = load_weights(dst, str(tmp_path))
    assert not res["unexpected"]
    torch.testing.assert_close(dst.prj[1].weight, src.prj[1].weight)
    torch.testing.assert_close(dst.codi.model.layers[0].mlp.up_proj.weight, src.codi.model.layers[0].mlp.up_proj.weight)


def test_trainer_end_to_end(tmp_path, capsys):
    """Phase-1 JSON -> training (loss goes down, checkpoint) -> resume -> eval from the checkpoint."""
    from latentfast.eval import adaptive
    from latentfast.train import codi

    data = tmp_path / "hybrid"
    info = codi_data.main(["--data_name", "synthetic", "--max_samples", "64", "--output_dir", str(data)])
    assert info["samples"] == 64
    out = tmp_path / "run"
    common = ["--hybrid_data_path", str(data / codi_data.OUTPUT_NAME), "--output_dir", str(out),
              "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--sft_steps", "0",
              "--hybrid_samples", "0", "--eval_size", "4", "--max_new_tokens", "8", "--logging_steps", "2",
              "--eval_modes", "latent", "--warmup_ratio", "0.1", "--prj_dim", "64"]
    res = codi.main(common + ["--max_steps", "6", "--save_steps", "3"])
    assert res["last"]["loss"] < res["first"]["loss"]
    assert (out / "checkpoint-6" / "model.safetensors").exists()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))
    assert "Step 2: loss=" in capsys.readouterr().out
    res2 = codi.main(common + ["--max_steps", "7", "--resume_from_checkpoint", "latest"])
    assert res2["first"]["step"] == 7
    r = adaptive.main(["--ckpt_dir", str(out), "--data_name", "synthetic", "--max_samples", "4",
                       "--baseline_mode", "all", "--max_new_tokens", "6"])
    assert [x["mode"] for x in r] == ["adaptive", "explicit", "latent"]


@pytest.mark.cuda
def test_cuda_bf16_training_steps(tok):
    dev = torch.device("cuda")
    m = make_model(tok).to(dev)
    batch, idx = split_batch(examples(tok, n=8, seed=1, latent_prob=0.5), [False] * 8, tok.pad_token_id)
    batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = codi_loss(m, batch, idx.to(dev))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
