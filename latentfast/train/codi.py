"""CODI hybrid explicit/implicit training (seed note 003): the trainer. Its command line, flags and
defaults (the recipe's and the original CODI's) are ``codi_config.py`` (``latentfast-codi``;
torch-free, so ``--help`` answers at once); ``python -m latentfast.train.codi`` runs the same ``main``.
The training loop is ``latentfast.train.loop``; this file is the CODI-specific part.
"""
from __future__ import annotations

import json
import pathlib
import random
import time

import torch

from latentfast import files
from latentfast.data.rows import load_rows
from latentfast.eval import adaptive
from latentfast.hf import adapter
from latentfast.models.codi import CODIModel, collate, encode_example, load_weights, prepare_tokenizer, split_batch
from latentfast.models.local import load_causal_lm
from latentfast.nn.codi import CODIObjective

from . import codi_data
from .codi_config import CODIConfig, build_parser, parse_args
from .entry import console_entry
from .common import SampleStream
from .loop import Trainer
from .sft import warm_up


# ----------------------------------------------------------------------------- data
def make_batch(tok, samples, index0, cfg, device):
    """Encode samples; each one is pure CoT with probability hybrid_cot_only_ratio (seeded by
    its stream index, so a resumed run draws the same)."""
    exs, cot = [], []
    for j, s in enumerate(samples):
        pure = random.Random(cfg.seed * 7919 + index0 + j).random() < cfg.hybrid_cot_only_ratio
        latent = s.get("latent", [True] * len(s["steps"]))  # no phase-1 flags: original CODI
        if not any(latent):
            pure = True
        exs.append(encode_example(tok, s["question"], s["steps"], s["final"], None if pure else latent,
                                  cfg.num_latent, eos_delimiters=not cfg.remove_eos))
        cot.append(pure)
    batch, idx = split_batch(exs, cot, tok.pad_token_id)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return batch, idx.to(device)


def cot_batch(tok, samples, max_length, device):
    """The teacher's explicit-CoT sequences as an ``SFT`` batch (CE over CoT + answer)."""
    b = collate([encode_example(tok, s["question"], s["steps"], s["final"]) for s in samples], tok.pad_token_id)
    return {"input_ids": b["teacher_ids"].to(device), "attention_mask": b["teacher_mask"].to(device),
            "targets": b["teacher_targets"].to(device)}


def load_samples(cfg: CODIConfig, tok, model, rank, amp):
    if cfg.data_name:
        return codi_data.from_original(codi_data.read_rows(cfg.train_data), cfg.data_name, tok,
                                       cfg.max_token_num, cfg.include_last_cot)
    if cfg.hybrid_data_path:
        return codi_data.drop_long(codi_data.load_hybrid(cfg.hybrid_data_path), tok, cfg.max_token_num)
    rows = load_rows(cfg.train_data, None, cfg.seed)
    samples = codi_data.drop_long(codi_data.from_rows(rows), tok, cfg.max_token_num)
    if cfg.demo and cfg.hybrid_samples:
        # phase 1 in-process with the warmed-up model: entropy-guided + random hybrid samples
        saved = pathlib.Path(cfg.output_dir) / codi_data.OUTPUT_NAME
        if cfg.resume_from_checkpoint and saved.exists():  # the resumed run keeps its data
            return codi_data.load_hybrid(str(saved))
        sub = rows[:cfg.hybrid_samples]
        ents = codi_data.step_entropies(model.lm, tok, sub, 64, amp, progress=rank == 0)
        samples = codi_data.make_hybrid(sub, ents, seed=cfg.seed)
        if rank == 0:
            saved.write_text(json.dumps(samples, indent=1))
            print(f"[codi] phase 1 (in-process): {json.dumps(codi_data.summary(samples))} -> {saved}", flush=True)
    return samples


# ----------------------------------------------------------------------------- training
class CODI(Trainer):
    """CODI on the loop: the model, warm-up and phase-1 data in ``setup``, hybrid batches in
    ``batches``, the loss ``CODIObjective`` on ``CODIModel.forward``'s hidden states,
    ``latentfast.eval.adaptive`` at the end."""

    name = "codi"

    def setup(self):
        c, dev = self.cfg, self.device
        self.t_start = time.time()
        if c.demo and self.rank == 0:
            print("[codi] " + c.banner(), flush=True)
        # fp32 master weights under bf16 autocast (as HF Trainer's --bf16); a frozen LoRA base may stay bf16
        use_bf16 = c.bf16 if c.bf16 is not None else dev.type == "cuda"
        dtype = torch.bfloat16 if (c.lora_rank and use_bf16) else torch.float32
        self.tok, lm = load_causal_lm(c.model_name, dev, dtype=dtype, seed=c.seed)
        prepare_tokenizer(self.tok, lm)
        self.tok.model_max_length = c.model_max_length
        torch.manual_seed(c.seed)  # identical prj init on every rank
        model = CODIModel(lm, self.tok.bot_token_id, self.tok.eot_token_id, num_latent=c.num_latent,
                          prj_dim=c.prj_dim, use_prj=c.use_prj, prj_dropout=c.prj_dropout).to(dev)
        self.objective = CODIObjective(distill_loss_factor=c.distill_loss_factor, ref_loss_factor=c.ref_loss_factor,
                                       distill_layers=c.distill_layers, distill_loss_type=c.distill_loss_type,
                                       distill_div_std=c.distill_loss_div_std, ref_stats=c.print_ref_model_stats)
        if c.lora_rank:
            model.add_lora(c.lora_rank, c.lora_alpha)
        if c.restore_from:
            res = load_weights(model, c.restore_from)
            self.print(f"restored {c.restore_from}: {len(res['loaded'])} keys loaded, {len(res['tied'])} tied, "
                       f"{len(res['fresh_lora'])} new LoRA adapters, {len(res['frozen'])} frozen kept from the base")
        if self.rank == 0:
            keep = {"model_name_or_path": c.model_name, **{k: getattr(c, k) for k in (
                "num_latent", "prj_dim", "use_prj", "lora_rank", "lora_alpha", "remove_eos")}}
            files.write_json(self.out / "codi_config.json", keep, indent=1)  # atomic (read back by evaluation)
        if c.demo and c.sft_steps and not c.resume_from_checkpoint:  # the tiny model starts random
            warm_up(c, model.codi, self.tok, codi_data.from_rows(load_rows(c.train_data, None, c.seed + 1)),
                    steps=c.sft_steps, lr=c.sft_lr, output_dir=self.out / "sft_warmup", name="explicit CoT warm-up",
                    encode=cot_batch)
        self.codi = model
        self.samples = load_samples(c, self.tok, model, self.rank, self.amp)
        if not self.samples:
            raise ValueError("no training samples left (check --train_data / --data_name / --max_token_num)")
        if self.rank == 0 and not c.remove_eos and c.eval_data != "none":
            print("[codi] note: training with <eos> delimiters (--remove_eos False, the original's default); "
                  "latentfast.eval.adaptive decodes without them -- pass --remove_eos True as the original's "
                  "scripts do to evaluate in-process", flush=True)
        self.eval_rows = [] if c.eval_data == "none" or not c.eval_size else \
            load_rows(c.eval_data, c.eval_size, c.seed + 10_000)  # --eval_size 0: none (load_rows' 0 = all)
        self.modes = [m for m in c.eval_modes.split(",") if m]
        self.stream = SampleStream(self.samples, c.seed)
        self.eval_results = []

    def build_model(self):
        return self.codi

    def fsdp_layers(self, module):
        return list(adapter.decoder_layers(module.codi))

    def num_train_items(self):
        return len(self.samples)

    def batches(self, step):
        B = self.cfg.per_device_train_batch_size
        out = []
        for m in range(self.cfg.gradient_accumulation_steps):
            base = self.micro_start(step, m, B)
            out.append(make_batch(self.tok, [self.stream[base + i] for i in range(B)], base, self.cfg, self.device))
        return out

    def loss(self, mb):
        batch, student_index = mb
        return self.objective(self.model(batch, student_index), batch, self.module.head)

    def log_line(self, row):
        stats = f" ref_answer_prob={row['ref_answer_prob']:.4f}" if "ref_answer_prob" in row else ""
        return (f"Step {row['step']}: loss={row['loss']:.4f} ce={row.get('ce', 0):.4f} ref_ce={row['ref_ce']:.4f} "
                f"distill={row.get('distill', 0):.4f} lr={row['lr']:.2e}{stats}")

    def progress(self, row):
        return dict(loss=f"{row['loss']:.3f}", ce=f"{row.get('ce', 0):.3f}", ref=f"{row['ref_ce']:.3f}",
                    distill=f"{row.get('distill', 0):.3f}")

    def evaluate(self, step):
        if not (self.eval_rows and self.modes):
            return {}
        tag = "final" if step >= self.total else "step"
        self.eval_results = []
        for m in self.modes:
            r = adaptive.evaluate(self.module, self.tok, self.eval_rows, m, 64, self.cfg.max_new_tokens, amp=self.amp,
                                  rank=self.rank, world=self.world)
            self.record({"step": step, "eval": tag, **r})
            self.eval_results.append(r)
        return {}  # one row per mode, recorded above

    def on_train_end(self, result):
        h = result["history"]
        first, last = (h[0], h[-1]) if h else (None, None)
        if self.rank == 0:
            if self.eval_results:
                table = adaptive.results_table(self.eval_results)
                (self.out / "eval.md").write_text(table + "\n")
                print(table, flush=True)
            if first is not None:
                print(f"[codi] loss {first['loss']:.3f} -> {last['loss']:.3f} (ce {first.get('ce', 0):.3f} -> "
                      f"{last.get('ce', 0):.3f}, ref_ce {first['ref_ce']:.3f} -> {last['ref_ce']:.3f}); checkpoint "
                      f"{result['checkpoint']}; metrics {self.out / 'metrics.jsonl'}; "
                      f"{time.time() - self.t_start:.0f}s", flush=True)
        return {"first": first, "last": last, "eval": self.eval_results}


def run(cfg: CODIConfig) -> dict:
    """Train a parsed config (``latentfast-codi``: ``latentfast.scripts.train``)."""
    return CODI(cfg).fit()


def main(argv=None) -> dict:
    """``python -m latentfast.train.codi`` (and torchrun): parse, train."""
    return run(parse_args(argv))


cli = console_entry(main)


__all__ = ["CODI", "CODIConfig", "build_parser", "cli", "cot_batch", "load_samples", "main", "run", "make_batch",
           "parse_args"]


if __name__ == "__main__":
    cli()
