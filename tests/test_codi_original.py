"""The original CODI's flags, data handling and checkpoints (zhenyi4/codi train.py, src/model.py)."""
import pytest
import torch

from latentfast.data import build_tokenizer
from latentfast.models import build_tiny_causal_lm
from latentfast.models.codi import CODIModel, encode_example, prepare_tokenizer, split_batch
from latentfast.nn.codi import CODIObjective
from latentfast.train import codi, codi_data

SMALL = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128)
# scripts/train_llama1b_gsm8k-aug.sh, flags as typed there
ORIGINAL_SCRIPT = ("--model_name_or_path /models/Llama-3.2-1B-Instruct --data_name icot --seed 11 "
                   "--model_max_length 512 "
                   "--per_device_train_batch_size 32 --gradient_accumulation_steps 4 --bf16 --num_train_epochs 10 "
                   "--learning_rate 8e-4 --max_grad_norm 2.0 --use_lora True --lora_r 128 --lora_alpha 32 --lora_init "
                   "--weight_decay 0.1 --warmup_ratio 0.03 --lr_scheduler_type cosine --num_latent 6 --use_prj True "
                   "--prj_dim 2048 --prj_dropout 0.0 --distill_loss_div_std True --remove_eos True "
                   "--distill_loss_factor 20 --print_ref_model_stats True --max_token_num 200").split()


@pytest.fixture(scope="module")
def tok():
    return prepare_tokenizer(build_tokenizer())


def test_original_script_flags_parse_with_their_meaning(tmp_path):
    data = tmp_path / "gsm8k_aug.jsonl"
    data.write_text('{"question": "1+2?", "cot": "<<1+2=3>>", "answer": "3"}\n')
    model = tmp_path / "m"  # model folders must exist (checked at parsing)
    model.mkdir()
    script = [str(model) if a == "/models/Llama-3.2-1B-Instruct" else a for a in ORIGINAL_SCRIPT]
    a = codi.parse_args(script + ["--train_data", str(data)])
    assert (a.lora_rank, a.lora_alpha, a.lora_init) == (128, 32, True)
    assert (a.use_prj, a.prj_dim, a.num_latent) == (True, 2048, 6)
    assert (a.distill_loss_div_std, a.distill_loss_factor, a.remove_eos, a.max_token_num) == (True, 20.0, True, 200)
    assert (a.model_max_length, a.data_name, a.print_ref_model_stats, a.bf16) == (512, "icot", True, True)
    assert a.hybrid_cot_only_ratio == 0.0  # the original trains the student on every sample
    d = codi.parse_args(["--model_name_or_path", str(model)])  # the original's defaults where the seed note has none
    assert (d.distill_loss_type, d.distill_loss_div_std, d.distill_layers, d.remove_eos) == ("smooth_l1", False, "all",
                                                                                           False)
    assert (d.max_token_num, d.model_max_length, d.lora_alpha, d.lora_rank) == (1000, 28000, 16, 0)
    assert d.hybrid_cot_only_ratio == 0.2 and d.use_prj and d.num_latent == 6  # seed note 003's
    assert codi.parse_args(["--model_name_or_path", str(model), "--use_lora", "--lora_rank", "8"]).lora_rank == 8
    assert codi.parse_args(["--model_name_or_path", str(model), "--lora_r", "8", "--use_lora", "False"]).lora_rank == 0
    assert not codi.parse_args(["--model_name_or_path", str(model), "--no-use_prj"]).use_prj
    assert codi.parse_args(["--model_name_or_path", str(model), "--distill_loss_type", "l2"]).distill_loss_type == "l2"
    with pytest.raises(SystemExit):
        codi.parse_args(["--model_name_or_path", str(model), "--use_lora", "maybe"])
    with pytest.raises(SystemExit):
        codi.parse_args(["--model_name_or_path", str(model), "--lora_r", "8", "--lora_init", "False"])
    with pytest.raises(SystemExit):  # --data_name needs the dataset as a local file
        codi.parse_args(script)


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
    m = CODIModel(build_tiny_causal_lm(tok, **SMALL), tok.bot_token_id, tok.eot_token_id, num_latent=2, prj_dim=16)
    exs = [encode_example(tok, "Q%d" % i, ["1+%d=%d" % (i, i + 1)], str(i + 1), [True], 2) for i in range(3)]
    batch, idx = split_batch(exs, [False] * 3, tok.pad_token_id)
    _, met = CODIObjective(ref_stats=True)(m(batch, idx), batch, m.head)
    probs = []
    for e in exs:
        ids = torch.tensor([e["teacher_ids"]])
        p = m.lm(input_ids=ids).logits[0, e["teacher_distill"]].softmax(-1)
        probs.append(p[e["teacher_ids"][e["teacher_distill"] + 1]])
    torch.testing.assert_close(met["ref_answer_prob"], torch.stack(probs).mean(), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- original checkpoints
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]  # train.py, llama


def stock_tokenizer():
    """A plain HF tokenizer without <bot>/<eot> (as a downloaded Llama's): one token per character."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<unk>", "<eos>"] + list(string.printable))}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    t.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")


def stock_lm(tok, seed):
    """A tiny HF model whose vocab_size is the tokenizer's size (as Llama's / GPT-2's)."""
    from transformers import Qwen2ForCausalLM

    from latentfast.models.tiny import tiny_config

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(tiny_config(len(tok), **SMALL))


def original_codi_state(lora: bool, prj_dim=24, seed=1):
    """What the original's ``CODI`` module saves (``Trainer.save_model`` -> pytorch_model.bin):
    ``codi`` = the HF model resized to vocab_size + 3 (PEFT-wrapped with --use_lora), ``prj``."""
    from peft import LoraConfig, TaskType
    from torch import nn

    from latentfast.hf.adapter import wrap_peft  # get_peft_model without PEFT's transformers FutureWarning

    tok = stock_tokenizer()
    torch.manual_seed(seed)
    lm = stock_lm(tok, seed)
    lm.resize_token_embeddings(lm.config.vocab_size + 3)
    if lora:
        lm = wrap_peft(lm, LoraConfig(task_type=TaskType.CAUSAL_LM, inference_mode=False, r=8, lora_alpha=32,
                                      lora_dropout=0.1, target_modules=LORA_TARGETS, init_lora_weights=True))
        with torch.no_grad():  # trained adapters: lora_B is no longer zero
            for n, p in lm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    dim = lm.config.hidden_size
    orig = nn.Module()
    orig.codi = lm
    orig.prj = nn.Sequential(nn.Dropout(0.0), nn.Linear(dim, prj_dim), nn.GELU(), nn.Linear(prj_dim, dim))
    orig.prj.add_module("ln", nn.LayerNorm(dim))
    return orig.eval(), orig.state_dict()


def our_codi(lora: bool, prj_dim=24, seed=7):
    tok = stock_tokenizer()
    lm = stock_lm(tok, seed)
    V = lm.config.vocab_size
    prepare_tokenizer(tok, lm)
    assert (tok.bot_token_id, tok.eot_token_id, lm.get_input_embeddings().weight.shape[0]) == (V + 1, V + 2, V + 3)
    m = CODIModel(lm, tok.bot_token_id, tok.eot_token_id, num_latent=2, prj_dim=prj_dim)
    if lora:
        m.add_lora(8, 32)
    return tok, m.eval()


@pytest.mark.parametrize("lora", [False, True])
def test_original_checkpoint_round_trip(tmp_path, lora):
    from latentfast.models.codi import load_weights

    orig, sd = original_codi_state(lora)
    assert any(k.startswith("codi.base_model.model.") for k in sd) == lora and "prj.ln.weight" in sd
    torch.save(sd, tmp_path / "pytorch_model.bin")
    tok, m = our_codi(lora)
    res = load_weights(m, str(tmp_path))
    assert not res["missing"] and not res["unexpected"] and not res["fresh_lora"]
    assert sorted(res["loaded"]) == sorted(sd)  # same names: every key of the original's file is used
    back = m.state_dict()
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert torch.equal(back[k], v), k
    ids = torch.tensor([tok("Q: 3+4?\n")["input_ids"] + [tok.bot_token_id, tok.eot_token_id]])
    with torch.no_grad():
        torch.testing.assert_close(m.codi(input_ids=ids).logits, orig.codi(input_ids=ids).logits)
        h = torch.randn(2, m.config.hidden_size)
        torch.testing.assert_close(m.latent_embed(h), orig.prj(h))
    # a safetensors file without the tied lm_head (as HF's Trainer writes shared tensors once)
    from safetensors.torch import save_file

    head = [k for k in sd if k.endswith("lm_head.weight")][0]
    (tmp_path / "pytorch_model.bin").unlink()
    lm = orig.codi.get_base_model() if lora else orig.codi
    tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    save_file({k: v.contiguous() for k, v in sd.items() if not (tied and k == head)},
              str(tmp_path / "model.safetensors"))
    res = load_weights(our_codi(lora)[1], str(tmp_path))
    assert res["tied"] == ([head] if tied else []) and not res["missing"]


def test_original_checkpoint_mismatches_are_errors(tmp_path):
    from latentfast.models.codi import load_weights

    _, sd = original_codi_state(lora=True)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="rank 8"):  # LoRA checkpoint into a model without LoRA
        load_weights(our_codi(lora=False)[1], str(tmp_path))
    _, full = original_codi_state(lora=False)
    torch.save({**full, "codi.extra.weight": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="unexpected: codi.extra.weight"):
        load_weights(our_codi(lora=False)[1], str(tmp_path))
    torch.save({k: v for k, v in full.items() if "layers.1.mlp" not in k}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="missing: codi.model.layers.1.mlp"):
        load_weights(our_codi(lora=False)[1], str(tmp_path))
    # a full (non-LoRA) CODI checkpoint restored into a LoRA run: base weights load, adapters start fresh
    torch.save(full, tmp_path / "pytorch_model.bin")
    _, m = our_codi(lora=True)
    res = load_weights(m, str(tmp_path))
    assert res["fresh_lora"] and all(".lora_" in k for k in res["fresh_lora"]) and not res["missing"]
    torch.testing.assert_close(m.lm.model.layers[0].self_attn.q_proj.base_layer.weight,
                               full["codi.model.layers.0.self_attn.q_proj.weight"])


def test_original_checkpoint_through_ckpt_dir_and_restore_from(tmp_path):
    """--ckpt_dir (adaptive eval) and --restore_from (trainer) with a base model saved on disk."""
    from latentfast.eval import adaptive

    orig, sd = original_codi_state(lora=True)
    ck = tmp_path / "codi_ckpt"
    ck.mkdir()
    torch.save(sd, ck / "pytorch_model.bin")
    base = tmp_path / "base"
    tok = stock_tokenizer()
    stock_lm(tok, 3).save_pretrained(base)
    tok.save_pretrained(base)
    tok2, m = adaptive.load_codi(str(base), str(ck), torch.device("cpu"), num_latent=2, prj_dim=24, lora_rank=8,
                                 lora_alpha=32)
    back = m.state_dict()
    assert all(torch.equal(back[k], v) for k, v in sd.items())
    data = tmp_path / "icot.jsonl"
    data.write_text('{"question": "1+2?", "cot": "<<1+2=3>> <<3=3>>", "answer": "3"}\n' * 4)
    res = codi.main(["--model_name_or_path", str(base), "--restore_from", str(ck),
                     "--output_dir", str(tmp_path / "run"),
                     "--data_name", "icot", "--train_data", str(data), "--use_lora", "True", "--lora_r", "8",
                     "--lora_alpha", "32", "--lora_init", "--num_latent", "2", "--prj_dim", "24", "--max_steps", "1",
                     "--per_device_train_batch_size", "2", "--eval_data", "none", "--save_steps", "0",
                     "--remove_eos", "True", "--distill_loss_div_std", "True", "--print_ref_model_stats", "True",
                     "--device", "cpu"])
    assert res["first"]["step"] == 1 and "ref_answer_prob" in res["first"] and res["first"]["distill"] > 0
