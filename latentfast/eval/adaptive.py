"""Adaptive explicit/latent decoding of a CODI model, switched by next-token entropy.

    python -m latentfast.eval.adaptive --ckpt_dir runs/codi --baseline_mode adaptive --verbose
    python -m latentfast.eval.adaptive --model_type codi --base_model_path /models/Llama-3.2-1B-Instruct \\
        --ckpt_dir checkpoints/hybrid_codi --prj_dim 2048 --data_name gsm8k_test.jsonl --bf16 \\
        --baseline_mode adaptive --max_switch_count 5 --window_e_to_l 5 --window_l_to_e 0

Modes (``--baseline_mode``):
  explicit  plain greedy CoT decoding, never latent.
  latent    CODI inference: ``<bot>``, ``num_latent`` latent steps, ``<eot>``, then the
            answer decoded explicitly.
  adaptive  start explicit; per sample, at a step boundary (the last token ended a line,
            as latent blocks replace whole steps in training) and after at least
            ``window_e_to_l`` explicit tokens, switch to latent (feed ``<bot>``) when the
            next-token entropy drops below the running mean entropy of the explicit tokens
            so far (the model is sure: the step is easy, compress it -- the rule phase 1
            used to pick latent steps);
            in latent mode, after at least ``max(1, window_l_to_e)`` latent steps, switch
            back (feed ``<eot>``) when the entropy rises above the block's own reference
            (its first latent position's entropy: latent positions are not trained to
            predict text, so their entropies live on another scale than explicit ones),
            and always after ``num_latent`` latent steps. At most ``max_switch_count`` switches
            (both directions count; a latent block is only opened when there is room to
            close it), and never once the answer marker ``####`` has been written.
Reports accuracy, explicit tokens generated, latent steps and switches per problem.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import pathlib
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from latentfast.data import format_prompt
from latentfast.cli import check_path, cli_parser
from latentfast.data.rewards import correctness_reward, extract_answer
from latentfast.data.rows import load_rows
from latentfast.generation import decode
from latentfast.generation.switching import BOT as A_BOT, EOT as A_EOT, NONE as A_NONE, TOKEN as A_TOKEN, SwitchPolicy
from latentfast.models.codi import CODIModel, load_weights, prepare_tokenizer
from latentfast.models.local import load_causal_lm
from latentfast.runtime.device import amp_context

MODES = ("adaptive", "explicit", "latent")
TOKEN, BOT, LATENT, EOT = "token", "bot", "latent", "eot"


@dataclass
class SwitchController:
    """Mode switching for one sequence. Call ``decide(entropy)`` once per decoding step with
    the entropy (nats) of the prediction just made; it returns what to feed next:
    ``"token"`` (the predicted token), ``"bot"``, ``"latent"`` (a latent embedding) or ``"eot"``."""

    mode: str = "adaptive"
    max_switch_count: int = 5
    window_e_to_l: int = 5
    window_l_to_e: int = 0
    num_latent: int = 6
    state: str = "explicit"
    steps_in_mode: int = 0
    switches: int = 0
    latent_steps: int = 0
    answering: bool = False
    ent_sum: float = 0.0
    ent_count: int = 0
    latent_reference: float = math.inf
    events: list = field(default_factory=list)  # (step, "E->L" | "L->E", entropy, reference)
    _t: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    @property
    def reference(self) -> float:
        return self.ent_sum / self.ent_count if self.ent_count else math.inf

    def _switch(self, to: str, entropy: float) -> None:
        ref = self.reference if to == "latent" else self.latent_reference
        self.events.append((self._t, "E->L" if to == "latent" else "L->E", round(entropy, 4),
                            round(ref, 4) if math.isfinite(ref) else None))
        self.state, self.steps_in_mode = to, 0
        self.switches += 1

    def decide(self, entropy: float, boundary: bool = True) -> str:
        """``boundary``: the last explicit token ended a step (a latent block may open)."""
        entropy = float(entropy)
        self._t += 1
        if self.state == "latent":
            if self.steps_in_mode == 0:
                self.latent_reference = entropy
            cap = self.steps_in_mode >= self.num_latent
            early = (self.mode == "adaptive" and self.steps_in_mode >= max(1, self.window_l_to_e)
                     and entropy > self.latent_reference)
            if cap or early:
                self._switch("explicit", entropy)
                return EOT
            self.steps_in_mode += 1
            self.latent_steps += 1
            return LATENT
        # explicit
        if self.mode == "latent" and self.switches == 0:  # CODI: latent block right after the prompt
            self._switch("latent", entropy)
            return BOT
        if (self.mode == "adaptive" and boundary and not self.answering and self.switches + 2 <= self.max_switch_count
                and self.steps_in_mode >= self.window_e_to_l and entropy < self.reference):
            self._switch("latent", entropy)
            return BOT
        self.ent_sum += entropy
        self.ent_count += 1
        self.steps_in_mode += 1
        return TOKEN


@dataclass
class Generation:
    text: str
    tokens: int
    latent_steps: int
    switches: int
    trace: list  # [("E", text) | ("L", n_steps), ...]
    events: list


@functools.lru_cache(maxsize=8)
def _line_end_ids_cached(tok) -> frozenset:
    return frozenset(i for i in range(len(tok)) if tok.decode([i]).endswith("\n"))


def _line_end_ids(tok) -> frozenset:
    try:
        return _line_end_ids_cached(tok)
    except TypeError:  # unhashable tokenizer
        return _line_end_ids_cached.__wrapped__(tok)


@torch.no_grad()
def generate_adaptive(model, tok, questions: list[str], mode: str = "adaptive", max_new_tokens: int = 256,
                      max_switch_count: int = 5, window_e_to_l: int = 5, window_l_to_e: int = 0,
                      amp=None, compile: bool | None = None) -> list[Generation]:
    """Greedy batched decoding, each sequence switched by ``SwitchController``'s rule
    (``model``: CODIModel). Runs on the decode engine with ``SwitchPolicy``, the rule as
    batched device tensors (no host round trip per step)."""
    amp = amp or (lambda: torch.autocast("cpu", enabled=False))
    device = model.lm.get_input_embeddings().weight.device
    tok.padding_side = "left"
    enc = tok([format_prompt(q) for q in questions], return_tensors="pt", padding=True)
    ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
    policy = SwitchPolicy(model, mode, max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          bot_token_id=tok.bot_token_id, eot_token_id=tok.eot_token_id,
                          marker_ids=tok.answer_marker_ids, line_end_ids=_line_end_ids(tok),
                          max_switch_count=max_switch_count, window_e_to_l=window_e_to_l, window_l_to_e=window_l_to_e)
    with amp():
        res = decode(model, ids, mask, policy.budget(), policy, sync_ranks=False, compile=compile)
    gens = []
    for b in range(ids.shape[0]):
        out, trace, events = [], [], []
        rows = zip(res["actions"][b].tolist(), res["tokens"][b].tolist(), res["entropies"][b].tolist(),
                   res["refs"][b].tolist())
        for t, (act, nxt, ent, ref) in enumerate(rows, start=1):
            if act == A_NONE:  # done
                break
            if act == A_TOKEN:
                out.append(nxt)
                if trace and trace[-1][0] == "E":
                    trace[-1][1].append(nxt)
                else:
                    trace.append(("E", [nxt]))
            elif act in (A_BOT, A_EOT):
                events.append((t, "E->L" if act == A_BOT else "L->E", round(ent, 4),
                               round(ref, 4) if math.isfinite(ref) else None))
                if act == A_BOT:
                    trace.append(("L", 0))
            else:
                trace[-1] = ("L", trace[-1][1] + 1)
        trace = [(k, tok.decode(v, skip_special_tokens=True) if k == "E" else v) for k, v in trace]
        gens.append(Generation(tok.decode(out, skip_special_tokens=True), sum(1 for t in out if t != tok.eos_token_id),
                               int(res["latent_steps"][b]), int(res["switches"][b]), trace, events))
    return gens


def format_trace(g: Generation) -> str:
    parts = [f"E{v!r}" if k == "E" else f"L({v})" for k, v in g.trace]
    return " -> ".join(parts) if parts else "(nothing)"


def evaluate(model, tok, rows: list[dict], mode: str = "adaptive", batch_size: int = 32, max_new_tokens: int = 256,
             max_switch_count: int = 5, window_e_to_l: int = 5, window_l_to_e: int = 0, amp=None,
             verbose: bool = False, rank: int = 0, world: int = 1, progress: bool = False, records=None) -> dict:
    """Accuracy and mean explicit tokens / latent steps / switches over ``rows`` (split over ranks)."""
    was_training = model.training
    model.eval()
    mine = rows[rank::world]
    sums = torch.zeros(5, dtype=torch.float64)
    for i in tqdm(range(0, len(mine), batch_size), desc=f"eval {mode}", disable=not progress or verbose):
        batch = mine[i:i + batch_size]
        gens = generate_adaptive(model, tok, [r["question"] for r in batch], mode, max_new_tokens, max_switch_count,
                                 window_e_to_l, window_l_to_e, amp)
        correct = correctness_reward([g.text for g in gens], [r["answer"] for r in batch])
        for j, (r, g, c) in enumerate(zip(batch, gens, correct)):
            sums += torch.tensor([c, g.tokens, g.latent_steps, g.switches, 1.0], dtype=torch.float64)
            if verbose:
                gold = extract_answer(r["answer"]) if "####" in r["answer"] else r["answer"]
                print(f"[{mode}] #{rank + (i + j) * world}: {format_trace(g)}\n"
                      f"    switches: {g.events or 'none'} | pred {extract_answer(g.text)} gold {gold} "
                      f"{'OK' if c else 'WRONG'}", flush=True)
            if records is not None:
                records.append({"mode": mode, "question": r["question"], "gold": r["answer"], "output": g.text,
                                "correct": c, "tokens": g.tokens, "latent_steps": g.latent_steps,
                                "switches": g.switches, "events": g.events, "trace": g.trace})
    if world > 1 and torch.distributed.is_initialized():
        dev = model.lm.get_input_embeddings().weight.device
        t = sums.to(dev)
        torch.distributed.all_reduce(t)
        sums = t.cpu()
    n = max(1.0, sums[4].item())
    model.train(was_training)
    return {"mode": mode, "accuracy": sums[0].item() / n, "tokens": sums[1].item() / n,
            "latent_steps": sums[2].item() / n, "switches": sums[3].item() / n, "n": int(sums[4].item())}


def results_table(results: list[dict]) -> str:
    lines = ["| mode | accuracy | explicit tokens | latent steps | switches | n |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['mode']} | {r['accuracy']:.3f} | {r['tokens']:.1f} | {r['latent_steps']:.2f} | "
                     f"{r['switches']:.2f} | {r['n']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def build_parser():
    p = cli_parser(__doc__)
    a = p.add_argument
    a("--model_type", default="codi", choices=["codi"])
    a("--base_model_path", default=None, help="HF model path or 'tiny' (default: from the checkpoint's codi_config.json)")
    a("--ckpt_dir", default=None, help="latentfast-codi output/checkpoint dir, or an original CODI checkpoint")
    a("--prj_dim", type=int, default=None, help="default: codi_config.json, else 2048")
    a("--num_latent", type=int, default=None, help="default: codi_config.json, else 6")
    a("--use_prj", action=argparse.BooleanOptionalAction, default=None)
    a("--lora_rank", type=int, default=None, help="LoRA rank of the checkpoint (0 = none)")
    a("--lora_alpha", type=int, default=None)
    a("--data_name", default="gsm8k", help="'gsm8k' (shipped test sample), 'synthetic' or a JSONL path")
    a("--max_samples", type=int, default=None)
    a("--batch_size", type=int, default=32)
    a("--max_new_tokens", type=int, default=256)
    a("--baseline_mode", default="adaptive", choices=list(MODES) + ["all"])
    a("--max_switch_count", type=int, default=5)
    a("--window_e_to_l", type=int, default=5)
    a("--window_l_to_e", type=int, default=0)
    a("--verbose", action="store_true", help="print every problem's explicit/latent trace and switches")
    a("--output_file", default=None, help="JSONL of per-problem results")
    a("--seed", type=int, default=0)
    a("--device", default=None)
    a("--bf16", action=argparse.BooleanOptionalAction, default=None)
    return p


def load_codi(base_model_path: str, ckpt_dir: str | None, device, num_latent: int = 6, prj_dim: int = 2048,
              use_prj: bool = True, lora_rank: int = 0, lora_alpha: int | None = None, seed: int = 0):
    """(tokenizer, CODIModel) from a base model and an optional CODI checkpoint."""
    tok, lm = load_causal_lm(base_model_path, device, seed=seed)
    prepare_tokenizer(tok, lm)
    model = CODIModel(lm, tok.bot_token_id, tok.eot_token_id, num_latent=num_latent, prj_dim=prj_dim,
                      use_prj=use_prj)
    if lora_rank:
        model.add_lora(lora_rank, lora_alpha)
    if ckpt_dir:
        res = load_weights(model, ckpt_dir)
        if [k for k in res["missing"] if not k.endswith("lm_head.weight")]:  # tied: saved once
            print(f"[adaptive] {len(res['missing'])} weights not in the checkpoint (kept from the base model)")
    return tok, model.to(device)


def codi_config(ckpt_dir: str | None) -> dict:
    """The trainer's ``codi_config.json`` next to (or above) the checkpoint, if any."""
    if not ckpt_dir:
        return {}
    p = pathlib.Path(ckpt_dir)
    for d in (p, p.parent):
        if (d / "codi_config.json").exists():
            return json.loads((d / "codi_config.json").read_text())
    return {}


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_path(parser, "--base_model_path", args.base_model_path, "model", ("tiny",))
    check_path(parser, "--ckpt_dir", args.ckpt_dir, "path")
    if args.data_name not in ("gsm8k", "synthetic"):
        check_path(parser, "--data_name", args.data_name, "file", what="a GSM8K-style JSONL file")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = codi_config(args.ckpt_dir)
    base = args.base_model_path or cfg.get("model_name_or_path", "tiny")
    pick = (lambda v, k, d: v if v is not None else cfg.get(k, d))
    tok, model = load_codi(base, args.ckpt_dir, device, pick(args.num_latent, "num_latent", 6),
                           pick(args.prj_dim, "prj_dim", 2048), pick(args.use_prj, "use_prj", True),
                           pick(args.lora_rank, "lora_rank", 0), pick(args.lora_alpha, "lora_alpha", None), args.seed)
    data = "gsm8k_test" if args.data_name == "gsm8k" else args.data_name
    n = args.max_samples or (100 if data == "synthetic" else None)
    rows = load_rows(data, n, seed=args.seed + 10_000)
    amp = amp_context(device, args.bf16)
    modes = list(MODES) if args.baseline_mode == "all" else [args.baseline_mode]
    records = [] if args.output_file else None
    results = [evaluate(model, tok, rows, m, args.batch_size, args.max_new_tokens, args.max_switch_count,
                        args.window_e_to_l, args.window_l_to_e, amp, args.verbose, progress=True, records=records)
               for m in modes]
    print(results_table(results), flush=True)
    if records is not None:
        with open(args.output_file, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return results


if __name__ == "__main__":
    main()
