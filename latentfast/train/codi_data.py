"""Phase 1 of hybrid CODI (seed note 003): per-step token entropy -> hybrid training JSON.

    python -m latentfast.train.codi_data --model_path /models/Llama-3.2-1B-Instruct \\
        --data_name gsm8k_train.jsonl --output_dir data/hybrid_training --bf16
    python -m latentfast.train.codi_data            # tiny random model on synthetic data (smoke run)

For every problem the model reads the worked answer teacher-forced; a step's entropy
is the mean next-token entropy over that step's tokens. Steps the model is sure
about (entropy below the ``--entropy_quantile`` of all steps) are the ones to
compress into latent steps. Each sample is written as

    {"question", "answer", "steps": [...], "final": "18", "step_entropy": [...],
     "latent": [true, false, ...], "type": "entropy" | "random"}

``type="random"`` samples (``--random_ratio`` of them) get random latent steps
instead, for robustness. The pure-CoT share is chosen at training time
(``latentfast-codi --hybrid_cot_only_ratio 0.2``), so the defaults here
(random_ratio 0.375 of the hybrid samples) give the recipe's overall mix:
~50% entropy-guided, ~30% random, ~20% pure CoT.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import random

import torch
from tqdm.auto import tqdm

from latentfast.choices import CODI_DATA_NAMES
from latentfast.cli import check_path, cli_parser, finite_float, positive_int
from latentfast.data import ANSWER_MARKER
from latentfast.data.rows import load_rows
from latentfast.models.codi import encode_example, prepare_tokenizer, split_answer
from latentfast.models.local import load_causal_lm
from latentfast.runtime.device import amp_context
from latentfast.train.checks import check_data_arg

OUTPUT_NAME = "hybrid_training_data.json"


@torch.no_grad()
def step_entropies(lm, tok, rows: list[dict], batch_size: int = 16, amp=None, progress: bool = True) -> list[list[float]]:
    """Mean next-token entropy (nats) over each reasoning step's tokens, per row."""
    amp = amp or (lambda: torch.autocast("cpu", enabled=False))
    device = lm.get_input_embeddings().weight.device
    was_training = lm.training
    lm.eval()
    out = []
    for i in tqdm(range(0, len(rows), batch_size), desc="step entropy", disable=not progress):
        chunk = rows[i:i + batch_size]
        encs = []
        for r in chunk:
            steps, final = split_answer(r["answer"])
            encs.append(encode_example(tok, r["question"], steps, final))
        T = max(len(e["teacher_ids"]) for e in encs)
        ids = torch.full((len(encs), T), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, e in enumerate(encs):
            ids[b, :len(e["teacher_ids"])] = torch.tensor(e["teacher_ids"])
            mask[b, :len(e["teacher_ids"])] = 1
        with amp():
            logits = lm(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = logits.log_softmax(-1)
        ent = -(logp.exp() * logp).sum(-1).cpu()  # (B, T): entropy of the prediction made at t
        for b, e in enumerate(encs):
            # tokens [s, e) are predicted at positions s-1 .. e-2
            out.append([ent[b, s - 1:t - 1].mean().item() if t > s else 0.0 for s, t in e["teacher_step_spans"]])
    lm.train(was_training)
    return out


def make_hybrid(rows: list[dict], entropies: list[list[float]], entropy_quantile: float = 0.5,
                random_ratio: float = 0.375, random_latent_prob: float = 0.5, seed: int = 0) -> list[dict]:
    """Hybrid samples: low-entropy steps latent ('entropy') or random ones ('random')."""
    flat = sorted(h for hs in entropies for h in hs)
    threshold = flat[min(len(flat) - 1, int(entropy_quantile * len(flat)))] if flat else 0.0
    rng = random.Random(seed)
    out = []
    for r, hs in zip(rows, entropies):
        steps, final = split_answer(r["answer"])
        if rng.random() < random_ratio:
            kind, latent = "random", [rng.random() < random_latent_prob for _ in steps]
        else:
            kind, latent = "entropy", [h < threshold for h in hs]
        out.append({"question": r["question"], "answer": r["answer"], "steps": steps, "final": final,
                    "step_entropy": [round(h, 4) for h in hs], "latent": latent, "type": kind})
    return out


def summary(samples: list[dict]) -> dict:
    n_steps = sum(len(s["steps"]) for s in samples)
    return {"samples": len(samples), "steps": n_steps,
            "latent_step_fraction": round(sum(sum(s["latent"]) for s in samples) / max(1, n_steps), 3),
            "types": {t: sum(s["type"] == t for s in samples) for t in sorted({s["type"] for s in samples})}}


def read_rows(path: str) -> list[dict]:
    """Rows of a JSON list or JSONL file."""
    text = pathlib.Path(path).read_text()
    return json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]


def load_hybrid(path: str) -> list[dict]:
    """Samples from a hybrid JSON (list) or JSONL file; rows without ``latent`` are pure CODI."""
    return from_rows(read_rows(path))


# ----------------------------------------------------------------------------- original CODI data
# The original CODI (zhenyi4/codi, train.py) reads these from the HF hub; here they are local
# files the user downloaded (JSON / JSONL with the hub's fields).
DATA_NAMES = CODI_DATA_NAMES  # (defined in latentfast.choices: latentfast-codi --help lists them)


def from_original(rows: list[dict], data_name: str, tok, max_token_num: int = 1000,
                  include_last_cot: bool = False) -> list[dict]:
    """Samples (question, steps, final) from the original's datasets, with its filters:
    rows over ``max_token_num`` tokens (``tok.encode`` of the raw question+cot+answer, as the
    original counts) are dropped, the last CoT step is dropped unless ``include_last_cot``,
    GSM8K-Aug answers that do not start with a digit are dropped. Every step is latent
    (no ``latent`` flags): pure CODI."""
    if data_name not in DATA_NAMES:
        raise ValueError(f"data_name must be one of {sorted(DATA_NAMES)}, got {data_name!r}")
    if data_name == "gsm8k":
        return drop_long(from_rows(rows), tok, max_token_num)
    out = []
    for i, r in enumerate(rows):
        missing = {"question", "cot", "answer"} - set(r)
        if missing:
            raise ValueError(f"--data_name {data_name}: row {i} lacks {sorted(missing)} ({DATA_NAMES[data_name]})")
        if r["answer"] is None or r["cot"] is None:
            continue
        q = str(r["question"])
        if data_name == "commonsense":
            cot, final = str(r["cot"]).strip(), str(r["answer"]).strip()
            if len(tok.encode(q.strip() + "\n" + " " + cot + "\n" + " " + "The answer is: " + final)) > max_token_num:
                continue
            steps = [x.strip() for x in cot.split("\n") if x.strip()]
        else:
            if len(tok.encode(q + r["cot"] + r["answer"])) > max_token_num:
                continue
            steps = r["cot"].split(". ") if data_name == "icot-full" else r["cot"].split(" ")
            if not include_last_cot:
                steps = steps[:-1]
            steps = [x.strip() for x in steps if x.strip()]
            final = str(r["answer"]).split(" ")[-1].replace("####", "")
            if not final[:1].isdigit():  # the original skips these (e.g. negative answers)
                continue
        out.append({"question": q.strip(), "steps": steps, "final": final})
    return out


def drop_long(samples: list[dict], tok, max_token_num: int) -> list[dict]:
    """Samples whose question + worked answer fit in ``max_token_num`` tokens (the
    original's ``--max_token_num``, "avoid OOM: remove very long data")."""
    def text(s):
        return s["question"] + (s.get("answer") or "\n".join(s["steps"]) + f" {ANSWER_MARKER} " + s["final"])
    return [s for s in samples if len(tok.encode(text(s))) <= max_token_num]


def from_rows(rows: list[dict]) -> list[dict]:
    """Add ``steps``/``final`` to question/answer rows (kept as they are when present)."""
    out = []
    for r in rows:
        if "steps" not in r:
            r = dict(r)
            r["steps"], r["final"] = split_answer(r["answer"])
        out.append(r)
    return out


def build_parser():
    p = cli_parser(__doc__)
    a = p.add_argument
    a("--model_path", default="tiny", help="local HF model path; 'tiny' = random tiny model (smoke run)")
    a("--data_name", default="synthetic", help="JSONL path, 'gsm8k' (shipped sample) or 'synthetic'")
    a("--max_samples", type=positive_int, default=None)
    a("--output_dir", default="data/hybrid_training")
    a("--batch_size", type=positive_int, default=16)
    a("--entropy_quantile", type=finite_float, default=0.5, help="steps below this entropy quantile go latent")
    a("--random_ratio", type=finite_float, default=0.375, help="share of samples with random latent steps")
    a("--random_latent_prob", type=finite_float, default=0.5)
    a("--seed", type=int, default=0)
    a("--device", default=None)
    a("--bf16", action=argparse.BooleanOptionalAction, default=None)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_path(parser, "--model_path", args.model_path, "model", ("tiny",))
    check_data_arg(parser, "--data_name", args.data_name)
    for flag in ("entropy_quantile", "random_ratio", "random_latent_prob"):
        if not 0.0 <= getattr(args, flag) <= 1.0:
            parser.error(f"--{flag}: expected a number in [0, 1], got {getattr(args, flag)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n = args.max_samples or (512 if args.data_name == "synthetic" else None)
    rows = load_rows(args.data_name, n, args.seed)
    tok, lm = load_causal_lm(args.model_path, device, seed=args.seed)
    prepare_tokenizer(tok, lm)
    ents = step_entropies(lm, tok, rows, args.batch_size, amp_context(device, args.bf16))
    samples = make_hybrid(rows, ents, args.entropy_quantile, args.random_ratio, args.random_latent_prob, args.seed)
    out = pathlib.Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / OUTPUT_NAME).write_text(json.dumps(samples, indent=1))
    info = summary(samples)
    print(f"[codi_data] wrote {out / OUTPUT_NAME}: {json.dumps(info)}", flush=True)
    return info


if __name__ == "__main__":
    main()
