"""CODI hybrid explicit/implicit training (seed note 003).

    latentfast-codi                                    # embedded demo (tiny model, synthetic data)
    python -m latentfast.train.codi --model_name_or_path /models/Llama-3.2-1B-Instruct \\
        --hybrid_data_path data/hybrid_training/hybrid_training_data.json --output_dir checkpoints/hybrid_codi \\
        --num_train_epochs 5 --per_device_train_batch_size 4 --learning_rate 2e-5 \\
        --num_latent 6 --prj_dim 2048 --hybrid_cot_only_ratio 0.2 --bf16
    ... --restore_from ./CODI/pretrained/CODI-llama3.2-1b-Instruct   # continue from a CODI checkpoint
    torchrun --nproc_per_node 8 -m latentfast.train.codi ...
    ... --data_name icot --train_data gsm8k_aug.jsonl --use_lora True --lora_r 128 --lora_alpha 32 --lora_init \
        --distill_loss_div_std True --distill_loss_factor 20 --remove_eos True --max_token_num 200  # original CODI

The original CODI's flags (zhenyi4/codi train.py) keep its meanings and defaults
(distillation: every hidden state incl. the embeddings, smooth L1, no std division);
``--data_name`` reads its datasets from a local ``--train_data`` file (``codi_data.from_original``).

One model is both teacher (explicit CoT) and student (latent steps, see
``latentfast.models.codi``). Per sample, with probability ``--hybrid_cot_only_ratio``
the latent part is skipped (pure CoT: teacher CE only); otherwise the sample's
latent steps (from the phase-1 JSON of ``latentfast.train.codi_data``, or every step
for a plain GSM8K JSONL = original CODI) become latent blocks, and

    loss = CE(student) + distill_loss_factor * CODI distill + ref_loss_factor * CE(teacher)

The demo (no ``--model_name_or_path``) runs the whole pipeline on a tiny model: an
explicit-CoT warm-up (``SFT`` on the teacher sequences; it stands in for the pretrained
model), phase-1 entropies, hybrid training, then ``latentfast.eval.adaptive`` in the three modes.
The training loop is ``latentfast.train.loop``; this file is the CODI-specific part.
"""
from __future__ import annotations

import json
import pathlib
import random
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from latentfast import files
from latentfast.data.rows import load_rows
from latentfast.eval import adaptive
from latentfast.hf import adapter
from latentfast.models.codi import CODIModel, collate, encode_example, load_weights, prepare_tokenizer, split_batch
from latentfast.models.local import load_causal_lm
from latentfast.nn.codi import LOSS_TYPES

from . import codi_data, demos
from .common import SampleStream, check_data_arg, console_entry
from .config import check, option
from .demos import DEMO_MODEL, EmbeddedDemo
from .loop import TrainConfig, Trainer
from .sft import warm_up



@dataclass
class CODIConfig(EmbeddedDemo, TrainConfig):
    """CODI hybrid explicit/latent training: the recipe's flags (phase2_train_compatible.py) and
    the original CODI's (zhenyi4/codi train.py), their meanings and defaults."""

    model_name: str = option(DEMO_MODEL, "local HF model path; 'tiny' = embedded demo", aliases=("model_name_or_path",),
                             path="model", names=(DEMO_MODEL,))
    hybrid_data_path: str | None = option(None, "phase-1 JSON (latentfast.train.codi_data); default: --train_data",
                                          path="file")
    output_dir: str = option("runs/codi", "where checkpoints, metrics.jsonl, codi_config.json and eval.md go")
    num_train_epochs: float = 5.0
    per_device_train_batch_size: int = 4
    lr: float = 2e-5
    warmup_ratio: float = 0.1
    max_grad_norm: float = 2.0
    num_latent: int = option(6, "latent steps per latent block", min=0)
    prj_dim: int = option(2048, "hidden width of the latent projection", min=1)
    use_prj: bool = option(True, "latent projection (Linear-GELU-Linear-LayerNorm)")
    prj_dropout: float = option(0.0, "dropout before the projection", min=0.0, max=1.0)
    distill_loss_factor: float = option(1.0, "weight of the CODI distillation loss")
    ref_loss_factor: float = option(1.0, "weight of the teacher's (explicit CoT) CE")
    distill_loss_type: str = option("smooth_l1", "smooth_l1 / l2 (the original's) or l1", choices=list(LOSS_TYPES))
    distill_loss_div_std: bool = option(False, "divide the distillation loss by the teacher's std (twice for l2)")
    distill_layers: str = option("all", "'all' (every hidden state incl. the embedding output, as the original) | "
                                        "'blocks' | 'middle' | 'last' | 'i,j,...'")
    hybrid_cot_only_ratio: float | None = option(
        None, "share of samples trained as pure explicit CoT (default 0.2; 0 with --data_name, as the original)")
    restore_from: str | None = option(None, "CODI checkpoint to start from (ours or original CODI weights)",
                                      path="path")
    use_lora: bool | None = option(None, "LoRA adapters (True: rank --lora_r, default 128); default: --lora_rank "
                                         "decides")
    lora_rank: int | None = option(None, "0 = full fine-tuning (default); CODI uses 128", aliases=("lora_r",))
    lora_alpha: int = option(16, "the original's default 16 (its scripts pass 32)")
    lora_init: bool | None = option(None, "PEFT's zero/Gaussian LoRA init (the only one here; the original's "
                                          "False = LoftQ is not supported)")
    remove_eos: bool = option(False, "no <eos> after the question and before the answer (the original's scripts "
                                     "pass True; latentfast's eval decodes without them)")
    max_token_num: int = option(1000, "drop samples longer than this many tokens (question+CoT+answer)")
    model_max_length: int = option(28000, "the tokenizer's model_max_length (as the original)")
    data_name: str | None = option(
        None, "the original's datasets, read from the local file --train_data: "
        + "; ".join(f"{k} = {v}" for k, v in codi_data.DATA_NAMES.items()), choices=sorted(codi_data.DATA_NAMES))
    include_last_cot: bool = option(False, "keep the last CoT step (--data_name icot / icot-full)")
    print_ref_model_stats: bool = option(False, "log the teacher's probability of the first answer token")
    train_data: str = option("gsm8k", "without --hybrid_data_path: JSONL path, 'gsm8k' sample or 'synthetic' (every "
                                      "step latent = original CODI); with --data_name: the local file of that dataset")
    eval_data: str = option("gsm8k_test", "JSONL path, 'gsm8k_test' sample, 'synthetic' or 'none'")
    eval_size: int = option(100, "held-out rows (latentfast.eval.adaptive)", min=0)
    eval_modes: str = option("latent,explicit,adaptive", "comma-separated latentfast.eval.adaptive modes")
    max_new_tokens: int = option(256, "decoding length at evaluation", min=1)
    sft_steps: int = option(0, "explicit-CoT warm-up steps before phase 1 (demo)", min=0)
    sft_lr: float = option(3e-3, "learning rate of the warm-up")
    hybrid_samples: int = option(0, "demo: phase-1 samples generated in-process", min=0)

    presets: ClassVar[tuple[dict, dict]] = (demos.CODI, demos.CODI_FULL)

    def __post_init__(self):
        super().__post_init__()  # (EmbeddedDemo: --full only in the demo)
        if self.hybrid_cot_only_ratio is None:  # the original trains the student on every sample
            self.hybrid_cot_only_ratio = 0.0 if self.data_name else 0.2
        if self.use_lora is not None:  # the original's switch; --lora_r / --lora_rank give the rank
            self.lora_rank = (self.lora_rank or 128) if self.use_lora else 0
        self.lora_rank = self.lora_rank or 0
        if self.lora_rank < 0:
            raise ValueError(f"--lora_rank must be >= 0, got {self.lora_rank}")
        if self.lora_rank and self.lora_init is False:
            raise ValueError("--lora_init False (LoftQ adapters) is not supported: drop it or pass --lora_init")
        if self.max_token_num < 1:
            raise ValueError(f"--max_token_num must be >= 1, got {self.max_token_num}")
        check(self.distill_loss_type in LOSS_TYPES, "distill_loss_type", f"one of {list(LOSS_TYPES)}",
              self.distill_loss_type)
        check(self.data_name is None or self.data_name in codi_data.DATA_NAMES, "data_name",
              f"one of {sorted(codi_data.DATA_NAMES)}", self.data_name)

    def check_cli(self, parser):
        if not self.data_name:  # with --data_name, codi_data.from_original checks the rows
            check_data_arg(parser, "--train_data", self.train_data)
        check_data_arg(parser, "--eval_data", self.eval_data, allowed=("none",))
        super().check_cli(parser)  # --resume_from_checkpoint
        if self.data_name and not pathlib.Path(self.train_data).is_file():
            parser.error(f"--data_name {self.data_name} reads --train_data as a local file "
                         f"({codi_data.DATA_NAMES[self.data_name]}); not a file: {self.train_data!r}")


def build_parser():
    return CODIConfig.build_parser(__doc__)


def parse_args(argv=None) -> CODIConfig:
    return CODIConfig.parse(argv, __doc__)


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
    ``batches``, ``CODIModel.forward`` as the loss, ``latentfast.eval.adaptive`` at the end."""

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
                          prj_dim=c.prj_dim, use_prj=c.use_prj, prj_dropout=c.prj_dropout,
                          distill_loss_factor=c.distill_loss_factor, ref_loss_factor=c.ref_loss_factor,
                          distill_layers=c.distill_layers, distill_loss_type=c.distill_loss_type,
                          distill_div_std=c.distill_loss_div_std, ref_stats=c.print_ref_model_stats).to(dev)
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
        return self.model(batch, student_index)

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


def main(argv=None):
    return CODI(parse_args(argv)).fit()


cli = console_entry(main)


if __name__ == "__main__":
    cli()
