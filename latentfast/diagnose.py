"""Check the loss scales of KV distillation before training (seed note 004).

    python -m latentfast.diagnose                       # embedded tiny student/teacher pair
    python -m latentfast.diagnose --model_name PATH --teacher_model PATH --num_samples 10 \\
        --cka_weight 0.05 --cka_layers middle --use_teacher_attention

Runs a few samples through student and teacher and prints each loss's mean ± std,
its weighted share of the total, how much attention weighting changes the KV loss,
and the note's advice (CKA share > 15% -> lower --cka_weight, < 1% -> raise it).
Token importance comes from the fused kernel through ``QKCapture``: no
``output_attentions``, so the models keep their sdpa / flash attention.
"""
from __future__ import annotations

import argparse
import statistics

from latentfast.cli import check_path, cli_parser, finite_float, positive_int  # torch-free: --help is fast


def _parser() -> argparse.ArgumentParser:
    p = cli_parser(__doc__)
    p.add_argument("--model_name", default=None, help="student checkpoint (local path); default: embedded tiny model")
    p.add_argument("--teacher_model", default=None, help="teacher checkpoint (local path); default: embedded tiny model")
    p.add_argument("--data", default="synthetic", help="'synthetic', 'train'/'test' (shipped GSM8K sample) or a jsonl path")
    p.add_argument("--num_samples", type=positive_int, default=10)
    p.add_argument("--ce_weight", type=finite_float, default=1.0)
    p.add_argument("--kv_weight", type=finite_float, default=1.0)
    p.add_argument("--codi_weight", type=finite_float, default=0.5)
    p.add_argument("--cka_weight", type=finite_float, default=0.05)
    p.add_argument("--cka_layers", default="middle", help="middle | last | all | comma-separated student layers")
    p.add_argument("--kv_layers", default="all", help="student layers whose KV cache is distilled")
    p.add_argument("--use_teacher_attention", action="store_true", help="weight tokens by the teacher's attention")
    p.add_argument("--attention_layer", type=int, default=-1, help="layer whose attention gives token importance")
    p.add_argument("--max_length", type=positive_int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, the model and data paths checked (argparse errors, exit 2) before any work."""
    p = _parser()
    args = p.parse_args(argv)
    check_path(p, "--model_name", args.model_name, "model")
    check_path(p, "--teacher_model", args.teacher_model, "model")
    check_path(p, "--data", args.data, "file", ("synthetic", "train", "test"), "a GSM8K-style JSONL file")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def _models(args):
    from latentfast.data.tokenizer import build_tokenizer
    from latentfast.models.tiny import build_tiny_causal_lm

    if args.model_name is None or args.teacher_model is None:
        tok = build_tokenizer()
        student = build_tiny_causal_lm(tok, seed=args.seed) if args.model_name is None else None
        # a deeper, wider teacher with more KV heads: exercises layer pairing and KVProjection
        teacher = build_tiny_causal_lm(tok, seed=args.seed + 1, hidden_size=192, num_hidden_layers=6,
                                       num_attention_heads=6, num_key_value_heads=3,
                                       intermediate_size=512) if args.teacher_model is None else None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from latentfast.models.local import from_local

    if args.model_name is not None:
        tok = from_local(AutoTokenizer, args.model_name)
        student = from_local(AutoModelForCausalLM, args.model_name, dtype="auto")
    if args.teacher_model is not None:
        teacher = from_local(AutoModelForCausalLM, args.teacher_model, dtype="auto")
    return tok, student.to(args.device).eval(), teacher.to(args.device).eval()


def _samples(args) -> list[dict]:
    if args.data == "synthetic":
        from latentfast.data.synthetic import make_arithmetic

        return make_arithmetic(args.num_samples, seed=args.seed)
    from latentfast.data.gsm8k import load_gsm8k

    return load_gsm8k(args.data, limit=args.num_samples)


def _kv_shape(model):
    c = model.config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return heads, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def measure(args) -> dict[str, list[float]]:
    """Per-sample loss values: ce, kv, kv_weighted, codi, cka."""
    import torch

    from latentfast.data.gsm8k import format_prompt
    from latentfast.hf import adapter
    from latentfast.nn import CKALoss, CODILoss, KVProjection, QKCapture, cache_kv, layer_pairs
    from latentfast.ops import attention_token_importance, kv_loss

    torch.manual_seed(args.seed)
    tok, student, teacher = _models(args)
    dev = args.device
    Ls, Lt = student.config.num_hidden_layers, teacher.config.num_hidden_layers
    pairs = layer_pairs(Ls, Lt, args.kv_layers)
    (hs, ds), (ht, dt) = _kv_shape(student), _kv_shape(teacher)
    proj = None if (hs, ds) == (ht, dt) else KVProjection(hs, ds, ht, dt).to(dev)
    codi = CODILoss(student_dim=student.config.hidden_size, teacher_dim=teacher.config.hidden_size).to(dev)
    cka = CKALoss(args.cka_layers)
    marker = getattr(tok, "answer_marker_id", None)
    if marker is None:
        marker = tok.convert_tokens_to_ids("####") if "####" in tok.get_vocab() else None

    vals = {k: [] for k in ("ce", "kv", "kv_weighted", "codi", "cka")}
    for row in _samples(args):
        prompt = format_prompt(row["question"])
        ids = tok(prompt + row["answer"], return_tensors="pt", truncation=True,
                  max_length=args.max_length)["input_ids"].to(dev)
        n_prompt = min(len(tok(prompt)["input_ids"]), ids.shape[1] - 1)
        labels = ids.clone()
        labels[:, :n_prompt] = -100
        with torch.no_grad(), QKCapture(student, [args.attention_layer]) as cs, \
                QKCapture(teacher, [args.attention_layer]) as ct:
            s_out = student(input_ids=ids, labels=labels, output_hidden_states=True, use_cache=True)
            t_out = teacher(input_ids=ids, output_hidden_states=True, use_cache=True)
            src = ct if args.use_teacher_attention else cs
            importance = attention_token_importance(*src.qk[args.attention_layer])
            s_kv = cache_kv(adapter.output_cache(s_out))
            t_kv = cache_kv(adapter.output_cache(t_out))
            plain, weighted = [], []
            for s, t in pairs:
                sk, sv = proj(*s_kv[s]) if proj is not None else s_kv[s]
                plain.append(kv_loss(sk, sv, *t_kv[t]))
                weighted.append(kv_loss(sk, sv, *t_kv[t], importance=importance))
            # CODI distils the hidden state at the token before the answer ("####" in GSM8K format)
            where = (ids[0] == marker).nonzero() if marker is not None else torch.empty(0)
            pos = torch.tensor([int(where[-1]) if len(where) else ids.shape[1] - 2], device=dev)
            vals["ce"].append(s_out.loss.item())
            vals["kv"].append(torch.stack(plain).mean().item())
            vals["kv_weighted"].append(torch.stack(weighted).mean().item())
            vals["codi"].append(codi(s_out.hidden_states, t_out.hidden_states, pos, pos).item())
            vals["cka"].append(cka(s_out.hidden_states, t_out.hidden_states).item())
    return vals


def _ms(xs):
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def report(vals: dict, args) -> str:
    line = "=" * 80
    out = [line, "Loss Scales (Mean ± Std)", line]
    names = [("ce", "CE Loss"), ("kv", "KV Loss"), ("kv_weighted", "KV-weighted"), ("codi", "CODI Loss"), ("cka", "CKA Loss")]
    means = {}
    for key, label in names:
        m, s = _ms(vals[key])
        means[key] = m
        out.append(f"{label + ':':<18}{m:10.4f} ± {s:8.4f}")
    contrib = {"CE": (means["ce"] * args.ce_weight, None), "KV": (means["kv"] * args.kv_weight, args.kv_weight),
               "CODI": (means["codi"] * args.codi_weight, args.codi_weight),
               "CKA": (means["cka"] * args.cka_weight, args.cka_weight)}
    total = sum(c for c, _ in contrib.values()) or 1.0
    pct = {k: 100.0 * c / total for k, (c, _) in contrib.items()}
    out += ["", line, "Weighted Contributions", line]
    for k, (c, w) in contrib.items():
        tail = f"  [weight={w:g}]" if w is not None else ""
        out.append(f"{k + ' contribution:':<20}{c:10.4f}  ({pct[k]:5.1f}%){tail}")

    out += ["", "📋 Recommendations:"]
    if pct["CKA"] > 15:
        out.append(f"⚠️  CKA contribution {pct['CKA']:.1f}% > 15%: lower --cka_weight (e.g. 0.01)")
    elif pct["CKA"] < 1:
        out.append(f"⚠️  CKA contribution {pct['CKA']:.1f}% < 1%: CKA has little effect; raise --cka_weight (e.g. 0.1)")
    else:
        out.append(f"✅ CKA weight is reasonable ({pct['CKA']:.1f}% of total)")
    if pct["KV"] > 50:
        out.append(f"⚠️  KV contribution {pct['KV']:.1f}% > 50%: KV loss dominates CE; lower --kv_weight")
    elif pct["KV"] < 1:
        out.append(f"⚠️  KV contribution {pct['KV']:.1f}% < 1%: KV distillation has little effect; raise --kv_weight")
    else:
        out.append(f"✅ KV weight is reasonable ({pct['KV']:.1f}% of total)")
    effect = 100.0 * abs(means["kv_weighted"] - means["kv"]) / max(means["kv"], 1e-12)
    source = "teacher" if args.use_teacher_attention else "student"
    out.append(f"📊 Attention weighting effect: {effect:.1f}% change in KV loss ({source} attention)")
    if effect < 1:
        out.append("   ⚠️  Almost no change - attention is near uniform, weighting will do little")
    elif effect > 30:
        out.append("   ⚠️  Large change - consider --use_teacher_attention or a longer --attention_weighted_kv_warmup")
    else:
        out.append("   ✅ Reasonable change - attention weighting should work")
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    vals = measure(args)
    print(report(vals, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
