"""Evaluate an HRPO checkpoint with hybrid thinking, as the recipe's ``eval_*.py``.

    latentfast-hrpo-eval --checkpoint_path runs/hrpo/checkpoint-400            # the run's task and held-out set
    latentfast-hrpo-eval --checkpoint_path ckpt --task gsm8k --data gsm8k/test.jsonl --batch_size 32
    latentfast-hrpo-eval --checkpoint_path ckpt --task math --data MATH-500/test.jsonl --temperature 0.5
    latentfast-hrpo-eval --checkpoint_path ckpt --task arc_c --data ARC-Challenge/test.jsonl
    torchrun --nproc_per_node 8 -m latentfast.eval.hrpo --checkpoint_path ckpt --task gsm8k --data ...

Loads a latentfast checkpoint (``latentfast.runtime.checkpoint``: LoRA + HRPO's modules, or
the full model) onto its base model, which the trainer records in ``trainer_state.json``
(``extra.hrpo``: base model, LoRA rank, thinking state, projection, prompt settings, task,
held-out data); decodes greedily (the recipe's default) or with ``--temperature``; writes
``eval_<task>.json`` (metrics) and ``eval_<task>_generations.jsonl`` (every generation) into
the checkpoint directory.

Metrics: ``accuracy`` (the recipe's eval metric: the normalised answer after the last
``####`` equals the gold), ``reward`` (the recipe's training reward: correct AND exactly one
``####``), ``format`` (exactly one ``####``), ``completion_length`` (tokens),
``embeds_ratio`` (the thinking gate's mean mixing weight over thinking positions),
``thinking_fraction``; ``accuracy_by_subject`` for ``mmlu_stem``; ``accuracy_subset`` with
``--subset_path`` (the recipe's MATH-500 number when evaluating the MATH test set).
The trainer's own held-out evaluation is this same function.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import pathlib

# torch-free at import (torch, models, runtime are imported where used): --help answers in a blink
from latentfast.cli import check_path, cli_parser, finite_float, positive_int
from latentfast.data.prompts import encode_prompts, prepare_tokenizer
from latentfast.data.rewards import marker_format_reward
from latentfast.data.synthetic import SETS as SYNTHETIC_SETS
from latentfast.data.tasks import BUILTIN, TASKS, get_task, load_task_rows


# ----------------------------------------------------------------------------- evaluation
def _dist():
    import torch

    d = torch.distributed
    return d if d.is_available() and d.is_initialized() and d.get_world_size() > 1 else None


def _no_grad(fn):
    """``torch.no_grad()`` as a decorator, torch imported at the call."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)
    return wrapper


@_no_grad
def evaluate(model, tok, task, rows, *, max_prompt_length: int, max_new_tokens: int, batch_size: int = 64,
             greedy: bool = True, temperature: float = 0.5, top_p: float = 1.0, system_prompt: str | None = None,
             chat_template: bool | None = None, amp=contextlib.nullcontext, gathered=contextlib.nullcontext,
             generator=None, progress: bool = False, subset: set | None = None):
    """(metrics, records) for ``rows`` of ``task`` (a name or ``Task``), split over the
    ranks of an initialised process group (every rank returns the same full result).

    ``model`` is a ``HybridThinkingLM``; ``gathered`` a context for each generation call (the
    trainer's FSDP gather); ``temperature`` also shapes the soft thinking state when greedy."""
    import torch
    from tqdm.auto import tqdm

    from latentfast.generation import eos_token_ids, generate

    task = get_task(task)
    d = _dist()
    rank, world = (d.get_rank(), d.get_world_size()) if d else (0, 1)
    device = next(model.parameters()).device
    model.eval()
    mine = list(range(rank, len(rows), world))
    # the same number of generation calls on every rank (they are collective under FSDP and
    # for the early stop): a rank out of rows repeats a batch and drops the result
    n_batches = -(-(-(-len(rows) // world)) // batch_size)
    marker_ids = tok.encode(model.cfg.answer_marker, add_special_tokens=False)
    eos_ids = eos_token_ids(tok, model.hf_model)
    records, right = [], 0.0
    bar = tqdm(total=len(mine), desc=f"eval {task.name}", disable=not progress or rank != 0, dynamic_ncols=True)
    for b in range(n_batches):
        idx = mine[b * batch_size:(b + 1) * batch_size]
        pad = not idx
        batch = [rows[i] for i in idx] if idx else [rows[(mine or [0])[-1]]]
        ids, mask = encode_prompts(tok, [r["question"] for r in batch], max_prompt_length, device, system_prompt,
                                   chat_template)
        with amp(), gathered():
            ro = generate(model, ids, mask, max_new_tokens, eos_token_id=eos_ids, pad_token_id=tok.pad_token_id,
                          marker_ids=marker_ids, temperature=temperature, top_p=top_p, do_sample=not greedy,
                          generator=generator)
        if pad:
            continue
        comp = ro.completion_ids.masked_fill(ro.completion_mask == 0, tok.pad_token_id)
        texts = tok.batch_decode(comp.tolist(), skip_special_tokens=True)
        golds = [r["answer"] for r in batch]
        acc, rew = task.accuracy(texts, golds), task.rewards["hrpo"](texts, golds)
        fmt, preds = marker_format_reward(texts), task.predictions(texts)
        lens = ro.completion_mask.sum(1).tolist()
        n_think = ro.thinking_mask.sum(1).tolist()
        ratios = torch.split(ro.embeds_ratio.float(), n_think) if ro.embeds_ratio.numel() else [None] * len(batch)
        for j, i in enumerate(idx):
            rec = {"index": i, "question": batch[j]["question"], "gold": golds[j], "prediction": preds[j],
                   "completion": texts[j], "accuracy": acc[j], "reward": rew[j], "format": fmt[j],
                   "completion_length": lens[j], "thinking_tokens": n_think[j],
                   "embeds_ratio_sum": float(ratios[j].sum()) if ratios[j] is not None else 0.0}
            if "subject" in batch[j]:
                rec["subject"] = batch[j]["subject"]
            records.append(rec)
        right += sum(acc)
        bar.update(len(idx))
        bar.set_postfix(acc=f"{right / len(records):.3f}", correct=f"{int(right)}/{len(records)}")
    bar.close()
    if d:
        parts = [None] * world
        d.all_gather_object(parts, records)
        records = [r for p in parts for r in p]
    records.sort(key=lambda r: r["index"])
    return summarize(records, task, subset), records


def summarize(records: list[dict], task, subset: set | None = None) -> dict:
    """The metrics of a list of generation records."""
    n = max(1, len(records))
    think = sum(r["thinking_tokens"] for r in records)
    tokens = sum(r["completion_length"] for r in records)
    m = {"n": len(records), **{k: sum(r[k] for r in records) / n for k in ("accuracy", "reward", "format",
                                                                              "completion_length")},
         "embeds_ratio": sum(r["embeds_ratio_sum"] for r in records) / max(1, think),
         "thinking_fraction": think / max(1, tokens)}
    if get_task(task).by_subject:
        by: dict = {}
        for r in records:
            by.setdefault(r.get("subject", "unknown"), []).append(r["accuracy"])
        m["accuracy_by_subject"] = {k: sum(v) / len(v) for k, v in sorted(by.items())}
    if subset is not None:
        sub = [r["accuracy"] for r in records if r["question"] in subset]
        m["accuracy_subset"], m["n_subset"] = (sum(sub) / len(sub) if sub else 0.0), len(sub)
    return m


# ----------------------------------------------------------------------------- checkpoints
def hrpo_spec(args, base_model: str | None) -> dict:
    """What ``trainer_state.json`` records (``extra.hrpo``) so a checkpoint can be evaluated
    alone: ``base_model`` is the base's path (the demo's warmed-up ``<output_dir>/base_model``;
    found next to the checkpoint if the run folder moves), ``"tiny"`` for an unwarmed demo."""
    keys = ("model_name", "lora_rank", "thinking_state", "projection", "residual_r_min", "residual_r_max", "seed",
            "task", "system_prompt", "max_prompt_length", "max_completion_length", "temperature", "top_p",
            "eval_data", "eval_size", "dataset_root", "bf16")
    spec = {k: getattr(args, k, None) for k in keys}
    spec["chat_template"] = False if getattr(args, "no_chat_template", False) else None
    if base_model and pathlib.Path(base_model).is_dir() and not pathlib.Path(base_model).is_absolute():
        base_model = str(pathlib.Path(base_model).resolve())  # typed relative to the working directory
    spec["base_model"] = base_model
    return spec


def resolve_checkpoint(path: str) -> pathlib.Path:
    """A ``checkpoint-<step>`` folder, or a run folder (its latest checkpoint)."""
    from latentfast.runtime import checkpoint

    p = pathlib.Path(path)
    if (p / "trainer_state.json").exists():
        return p
    found = checkpoint.latest(str(p))  # the newest intact one (a warning names any skipped)
    if found is None:
        raise FileNotFoundError(f"--checkpoint_path {path!r}: no trainer_state.json there and no intact "
                                f"checkpoint-* in it")
    return pathlib.Path(found)


def load_checkpoint(path: str, device, model_name: str | None = None, bf16: bool | None = None):
    """(tokenizer, HybridThinkingLM with the checkpoint's weights, spec)."""
    import torch

    from latentfast.data import build_tokenizer
    from latentfast.models import HybridConfig, HybridThinkingLM, build_tiny_causal_lm
    from latentfast.models.local import from_local
    from latentfast.runtime import checkpoint

    ckpt = resolve_checkpoint(path)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    spec = dict(state.get("extra", {}).get("hrpo") or {})
    if not spec and model_name is None:
        raise ValueError(f"{ckpt}: trainer_state.json records no model (older checkpoint): pass --model_name")
    device = torch.device(device)
    use_bf16 = bf16 if bf16 is not None else (spec.get("bf16") if spec.get("bf16") is not None
                                               else device.type == "cuda")
    lora = int(spec.get("lora_rank") or 0)
    dtype = torch.bfloat16 if (lora > 0 and use_bf16) else torch.float32  # as the trainer holds it
    base = model_name or spec.get("base_model") or spec.get("model_name")
    if base == "tiny":  # the demo without a warm-up: the seeded random base
        tok = build_tokenizer()
        lm = build_tiny_causal_lm(tok, seed=spec.get("seed", 0))
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base_path = pathlib.Path(base)
        if not base_path.exists() and (ckpt.parent / base_path.name).is_dir():  # the run folder was moved
            base_path = ckpt.parent / base_path.name
        base = str(base_path) if base_path.exists() else base  # (or a hub id already in the local cache)
        # the demo's warmed-up base: the tokenizer is built in code, not saved
        tok = build_tokenizer() if spec.get("model_name") == "tiny" and model_name is None \
            else from_local(AutoTokenizer, base)
        lm = from_local(AutoModelForCausalLM, base, dtype=dtype)
    prepare_tokenizer(tok)
    lm = lm.to(device=device, dtype=dtype)
    torch.manual_seed(spec.get("seed", 0))  # as the trainer: a frozen (unsaved) module gets the same init
    cfg = HybridConfig(thinking_state=spec.get("thinking_state", "projection"),
                       projection=spec.get("projection", "linear"), r_min=spec.get("residual_r_min", 0.99),
                       r_max=spec.get("residual_r_max", 0.999))
    model = HybridThinkingLM(lm, cfg)
    if lora > 0:
        model.add_lora(lora)
    checkpoint.load(str(ckpt), model)
    return tok, model.eval(), spec


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = cli_parser(__doc__)
    a = p.add_argument
    a("--checkpoint_path", required=True, help="checkpoint-<step> folder, or a run folder (its latest)")
    a("--task", default=None, choices=sorted(TASKS), help="default: the checkpoint's")
    a("--data", default=None, help="eval file/folder (default: the run's held-out data)")
    a("--dataset_root", default=None, help="folder holding the splits (reads --split)")
    a("--split", default="test")
    a("--batch_size", type=positive_int, default=32)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--greedy", action="store_true", help="greedy decoding (the default)")
    g.add_argument("--temperature", type=finite_float, default=None, help="sample at this temperature instead")
    a("--top_p", type=finite_float, default=1.0)
    a("--num_samples", type=positive_int, default=None, help="evaluate the first N rows")
    a("--max_new_tokens", type=positive_int, default=None, help="default: the run's --max_completion_length")
    a("--max_prompt_length", type=positive_int, default=None, help="default: the run's")
    a("--system_prompt", default=None, help="default: the run's (the recipe's in the chat format)")
    a("--no_chat_template", action="store_true", help="plain 'Question: ...\\nAnswer:' prompts")
    a("--subset_path", default=None, help="also report accuracy on the rows whose question is in this file "
                                          "(e.g. MATH-500's test.jsonl when evaluating the MATH test set)")
    a("--model_name", default=None, help="base model path (default: the one the checkpoint records)")
    a("--output_dir", default=None, help="where the results go (default: the checkpoint folder)")
    a("--device", default=None)
    a("--bf16", action=argparse.BooleanOptionalAction, default=None)
    a("--seed", type=int, default=42)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, every path checked (argparse errors, exit 2) before anything is loaded."""
    p = build_parser()
    args = p.parse_args(argv)
    check_path(p, "--checkpoint_path", args.checkpoint_path, "dir",
               what="a checkpoint-<step> folder or a run folder holding them")
    try:
        resolve_checkpoint(args.checkpoint_path)
    except FileNotFoundError as e:
        p.error(f"{e} (expected a checkpoint-<step> folder or a run folder holding them)")
    if args.data not in BUILTIN and args.data not in SYNTHETIC_SETS:
        check_path(p, "--data", args.data, "path", what="a .jsonl/.json file or a folder with the split")
    check_path(p, "--dataset_root", args.dataset_root, "dir")
    check_path(p, "--subset_path", args.subset_path, "path")
    check_path(p, "--model_name", args.model_name, "model", ("tiny",))
    if args.temperature is not None and args.temperature <= 0:
        p.error(f"--temperature: expected a number > 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        p.error(f"--top_p: expected a number in (0, 1], got {args.top_p}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from latentfast.runtime import dist
    from latentfast.runtime.device import amp_context

    device, rank, world = dist.setup(args.device)
    tok, model, spec = load_checkpoint(args.checkpoint_path, device, args.model_name, args.bf16)
    ckpt = resolve_checkpoint(args.checkpoint_path)
    task = get_task(args.task or spec.get("task") or "gsm8k")
    same_task = task.name == (spec.get("task") or "gsm8k")
    data = args.data
    root = args.dataset_root or (spec.get("dataset_root") if same_task else None)
    n = args.num_samples
    if data is None and args.dataset_root is None and same_task:  # the run's own held-out set
        data = spec.get("eval_data")
        n = n or spec.get("eval_size")
    seed = (spec.get("seed") or 0) + 10_000  # the trainer's held-out seed (synthetic data)
    rows = load_task_rows(task, data, args.split, n, seed=seed, dataset_root=root)
    subset = None
    if args.subset_path:
        subset = {r["question"] for r in task.load(args.subset_path)}
    sampling = args.temperature is not None
    chat = False if args.no_chat_template else spec.get("chat_template")
    system_prompt = args.system_prompt if args.system_prompt is not None else spec.get("system_prompt")
    gen = torch.Generator(device=device).manual_seed(args.seed + rank) if sampling else None
    if rank == 0:
        print(f"[hrpo-eval] {ckpt}: task {task.name}, {len(rows)} rows, "
              f"{'temperature ' + str(args.temperature) if sampling else 'greedy'}, {world} rank(s)", flush=True)
    metrics, records = evaluate(
        model, tok, task, rows, max_prompt_length=args.max_prompt_length or spec.get("max_prompt_length") or 1024,
        max_new_tokens=args.max_new_tokens or spec.get("max_completion_length") or 512, batch_size=args.batch_size,
        greedy=not sampling, temperature=args.temperature if sampling else (spec.get("temperature") or 0.5),
        top_p=args.top_p, system_prompt=system_prompt, chat_template=chat,
        amp=amp_context(device, spec.get("bf16") if args.bf16 is None else args.bf16), generator=gen,
        progress=True, subset=subset)
    out = pathlib.Path(args.output_dir or ckpt)
    metrics.update(task=task.name, checkpoint=str(ckpt), data=data or root, greedy=not sampling,
                   temperature=args.temperature)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"eval_{task.name}.json").write_text(json.dumps(metrics, indent=1))
        with open(out / f"eval_{task.name}_generations.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        print(f"[hrpo-eval] accuracy {metrics['accuracy']:.4f}, reward {metrics['reward']:.4f}, "
              f"format {metrics['format']:.4f}, length {metrics['completion_length']:.1f}; "
              f"{out / f'eval_{task.name}.json'}", flush=True)
    del model
    dist.cleanup()
    return metrics


def cli() -> int:
    main()
    return 0


if __name__ == "__main__":
    cli()
