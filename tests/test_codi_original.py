"""The original CODI's flags, data handling and checkpoints (zhenyi4/codi train.py, src/model.py)."""
import pytest
import torch

from latentfast.data import build_tokenizer
from latentfast.models import build_tiny_causal_lm
from latentfast.models.codi import CODIModel, encode_example, prepare_tokenizer, split_batch
from latentfast.train import codi, codi_data

SMALL = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128)
# scripts/train_llama1b_gsm8k-aug.sh, flags as typed there
ORIGINAL_SCRIPT = ("--model_name_or_path /models/Llama-3.2-1B-Instruct --data_name icot --seed 11 --model_max_length 512 "
                   "--per_device_train_batch_size 32 --gradient_accumulation_steps 4 --bf16 --num_train_epochs 10 "
                   "--learning_rate 8e-4 --max_grad_norm 2.0 --use_lora True --lora_r 128 --lora_alpha 32 --lora_init "
                   "--weight_decay 0.1 --warmup_ratio 0.03 --lr_scheduler_type cosine --num_latent 6 --use_prj True "
                   "--prj_dim 2048 --prj_dropout 0.0 --distill_loss_div_std True --remove_eos True "
                   "--distill_loss_factor 20 --print_ref_model_stats True --max_token_num 200").split()


@pytest.fixture(scope="module")
def tok():
    return prepare_tokenizer(build_tokenizer())


def test_original_script_flags_parse_with_their_meaning():
    a = codi.parse_args(ORIGINAL_SCRIPT)
    assert (a.lora_rank, a.lora_alpha, a.lora_init, a.use_prj, a.prj_dim, a.num_latent) == (128, 32, True, True, 2048, 6)
    assert (a.distill_loss_div_std, a.distill_loss_factor, a.remove_eos, a.max_token_num) == (True, 20.0, True, 200)
    assert (a.model_max_length, a.data_name, a.print_ref_model_stats, a.bf16) == (512, "icot", True, True)
    assert a.hybrid_cot_only_ratio == 0.0  # the original trains the student on every sample
    d = codi.parse_args(["--model_name_or_path", "/m"])  # the original's defaults where the seed note has none
    assert (d.distill_loss_type, d.distill_loss_div_std, d.distill_layers, d.remove_eos) == ("smooth_l1", False, "all",
                                                                                           False)
    assert (d.max_token_num, d.model_max_length, d.lora_alpha, d.lora_rank) == (1000, 28000, 16, 0)
    assert d.hybrid_cot_only_ratio == 0.2 and d.use_prj and d.num_latent == 6  # seed note 003's
    assert codi.parse_args(["--model_name_or_path", "/m", "--use_lora", "--lora_rank", "8"]).lora_rank == 8
    assert codi.parse_args(["--model_name_or_path", "/m", "--lora_r", "8", "--use_lora", "False"]).lora_rank == 0
    assert not codi.parse_args(["--model_name_or_path", "/m", "--no-use_prj"]).use_prj
    assert codi.parse_args(["--model_name_or_path", "/m", "--distill_loss_type", "l2"]).distill_loss_type == "l2"
    with pytest.raises(SystemExit):
        codi.parse_args(["--model_name_or_path", "/m", "--use_lora", "maybe"])
    with pytest.raises(SystemExit):
        codi.parse_args(["--model_name_or_path", "/m", "--lora_r", "8", "--lora_init", "False"])


def test_eos_delimiters_are_the_originals(tok):
    steps, final = ["3+4=7", "7*2=14"], "14"
    plain = encode_example(tok, "Q?", steps, final, [True, True], num_latent=2)
    eos = encode_example(tok, "Q?", steps, final, [True, True], num_latent=2, eos_delimiters=True)
    e = tok.eos_token_id
    for side in ("teacher", "student"):
        ids, lab, pos = eos[f"{side}_ids"], eos[f"{side}_labels"], eos[f"{side}_distill"]
        n_prompt = plain[f"{side}_labels"].index(True) if side == "teacher" else None
        assert ids[pos] == tok.answer_marker_id and ids[pos - 1] == e  # <eos> right before the answer marker
        assert lab[pos - 1]  # ... and it is a target
        assert ids.count(e) == 3  # after the question, before the answer, at the end
        assert len(ids) == len(plain[f"{side}_ids"]) + 2
        if n_prompt is not None:
            assert ids[n_prompt] == e and not lab[n_prompt]  # after the question: part of the source
    s = eos["student_ids"]
    assert s[s.index(tok.bot_token_id) - 1] == e and s[s.index(tok.eot_token_id) + 1] == e  # q <eos> <bot>..<eot> <eos>
    sp = eos["teacher_step_spans"][0]
    assert tok.decode(eos["teacher_ids"][sp[0]:sp[1]]) == "3+4=7\n"


def test_original_datasets_and_filters(tok):
    icot = [{"question": "A has 3. B has 4 more. Total?", "cot": "<<3+4=7>> <<3+7=10>>", "answer": "#### 10"},
            {"question": "Neg?", "cot": "<<1-2=-1>>", "answer": "-1"},
            {"question": "Long " * 300, "cot": "<<1+1=2>>", "answer": "2"}]
    out = codi_data.from_original(icot, "icot", tok, max_token_num=200)
    assert out == [{"question": "A has 3. B has 4 more. Total?", "steps": ["<<3+4=7>>"], "final": "10"}]
    out = codi_data.from_original(icot, "icot", tok, max_token_num=10_000, include_last_cot=True)
    assert [o["steps"] for o in out] == [["<<3+4=7>>", "<<3+7=10>>"], ["<<1+1=2>>"]]
    # the count is tok.encode of the raw question+cot+answer, as the original's: the limit is inclusive
    n = len(tok.encode(icot[0]["question"] + icot[0]["cot"] + icot[0]["answer"]))
    assert len(codi_data.from_original(icot[:1], "icot", tok, max_token_num=n)) == 1
    assert len(codi_data.from_original(icot[:1], "icot", tok, max_token_num=n - 1)) == 0
    nl = [{"question": "Q", "cot": "He has 3. Then 4 more. So 7 in total.", "answer": "The answer is 7"},
          {"question": "Q2", "cot": "x", "answer": None}]
    assert codi_data.from_original(nl, "icot-full", tok)[0]["steps"] == ["He has 3", "Then 4 more"]
    cs = [{"question": " Where? ", "cot": "Think.\nMore.", "answer": "B"}]
    assert codi_data.from_original(cs, "commonsense", tok) == [{"question": "Where?", "steps": ["Think.", "More."],
                                                               "final": "B"}]
    gsm = [{"question": "Q", "answer": "1+1=2\n#### 2"}, {"question": "Q " * 400, "answer": "1+1=2\n#### 2"}]
    assert [s["final"] for s in codi_data.from_original(gsm, "gsm8k", tok, max_token_num=100)] == ["2"]
    with pytest.raises(ValueError, match="cot"):
        codi_data.from_original([{"question": "q", "answer": "1"}], "icot", tok)
    with pytest.raises(ValueError, match="data_name"):
        codi_data.from_original(icot, "prontoqa", tok)


def test_print_ref_model_stats_is_the_teachers_answer_probability(tok):
    torch.manual_seed(0)
    m = CODIModel(build_tiny_causal_lm(tok, **SMALL), tok.bot_token_id, tok.eot_token_id, num_latent=2, prj_dim=16,
                  ref_stats=True)
    exs = [encode_example(tok, "Q%d" % i, ["1+%d=%d" % (i, i + 1)], str(i + 1), [True], 2) for i in range(3)]
    batch, idx = split_batch(exs, [False] * 3, tok.pad_token_id)
    _, met = m(batch, idx)
    probs = []
    for e in exs:
        ids = torch.tensor([e["teacher_ids"]])
        p = m.lm(input_ids=ids).logits[0, e["teacher_distill"]].softmax(-1)
        probs.append(p[e["teacher_ids"][e["teacher_distill"] + 1]])
    torch.testing.assert_close(met["ref_answer_prob"], torch.stack(probs).mean(), rtol=1e-4, atol=1e-6)
