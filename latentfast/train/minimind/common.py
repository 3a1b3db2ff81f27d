"""What every MiniMind stage shares: the flag set, the model/weights, the loss module, the trainer.

A stage (``pretrain.py``, ``full_sft.py``, ...) is a config subclass (its defaults), a
``MiniMindTrainer`` subclass (its data and loss hook) and ``main = stage_main(...)``.

* ``MiniMindArgs``: MiniMind's flags (``trainer/*.py`` at a8455ca, see the notes) on the
  one loop's ``TrainConfig``. Flags that are loop options are aliases of its fields
  (``--epochs`` = ``--num_train_epochs``, ``--batch_size``, ``--learning_rate``,
  ``--accumulation_steps``, ``--grad_clip``, ``--log_interval``, ``--save_interval``); the
  rest map in ``MiniMindTrainer.__init__``: ``--dtype`` -> bf16 autocast, ``--from_resume 1``
  -> ``--resume_from_checkpoint latest``, ``--use_wandb`` -> ``init_wandb``. The
  schedule is MiniMind's ``lr * (0.1 + 0.45 * (1 + cos(pi * step / total)))``, AdamW
  with torch's default weight decay 0.01 on every parameter, as MiniMind.
* weights: ``{save_dir}/{save_weight}_{hidden_size}{_moe}.pth`` (fp16, MiniMind's keys) at
  every ``--save_interval`` and at the end; ``--from_weight NAME`` loads
  ``{save_dir}/NAME_{hidden_size}{_moe}.pth`` (or a ``.pth`` path), a missing file is an
  error naming it (``none`` = random init). Resumable checkpoints (model, optimizer,
  schedule, step, RNG, data position, wandb id) are the loop's, in
  ``{save_dir}/../checkpoints/{save_weight}_{hidden_size}{_moe}/`` (MiniMind's
  ``../checkpoints``) unless ``--output_dir`` is given, with ``metrics.jsonl``.
* losses through the fused lm_head engine (no (N, V) logits): ``LMLoss`` is the decoder, then
  ``fused_linear_cross_entropy`` on the masked targets (optional per-token weights) + the MoE
  aux loss, MiniMind's ``(sum(CE * mask) / sum(mask) + aux) / accumulation_steps``.
* demo: with no ``--data_path`` and MiniMind's default data file absent (or ``--data_path
  demo``) a stage trains a small model on the shipped GSM8K sample; a missing
  ``--from_weight`` there is one line and a short pretraining warm-up instead.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib

import torch
from torch import nn

from latentfast.data import minimind as mmdata
from latentfast.files import CorruptFileError
from latentfast.hf.adapter import unwrap
from latentfast.models.minimind import MiniMindForCausalLM, checkpoint_name, load_pth, model_config, save_pth
from latentfast.models.minimind.tokenizer import load_tokenizer
from latentfast.ops.cross_entropy import fused_linear_cross_entropy
from latentfast.runtime import dist

from ..common import SampleStream, console_entry
from ..config import demo_preset
from ..loop import Trainer
from .args import DEMO, DEMO_PRESET, STAGE_DEMOS, MiniMindArgs, is_demo, script_defaults

WARMUP_STEPS = 30  # the demo's stand-in for a missing --from_weight


# ---------------------------------------------------------------------------- model and weights
def weight_path(name: str, weight_dir, hidden_size: int, use_moe) -> pathlib.Path:
    """``{weight_dir}/{name}_{hidden_size}{_moe}.pth``, or ``name`` itself when it is a ``.pth`` path."""
    if name.endswith(".pth"):
        return pathlib.Path(name)
    return checkpoint_name(name, hidden_size, bool(use_moe), weight_dir)


def missing_weight_error(flag: str, name: str, path) -> FileNotFoundError:
    return FileNotFoundError(f"{flag} {name}: no such file {path} (expected MiniMind's "
                             f"{{save_dir}}/{{weight}}_{{hidden_size}}{{_moe}}.pth, or a .pth path; train that stage "
                             f"first, check --save_dir / --hidden_size / --use_moe, or pass {flag} none)")


def load_weights(lm, path, flag: str = "--from_weight"):
    """``load_pth`` strictly (same layer count, gate and MoE layout), errors naming the flag."""
    try:
        load_pth(lm, path, strict=True)
    except CorruptFileError as e:
        raise CorruptFileError(f"{flag}: {e}") from None
    except RuntimeError as e:
        raise RuntimeError(f"{flag}: {path} does not fit the model built from the flags "
                           f"(--hidden_size / --num_hidden_layers / --use_moe?): {e}") from None


class LMLoss(nn.Module):
    """The module DDP wraps: the decoder, the fused lm_head cross-entropy on the masked
    targets (``loss_weights`` optional, the mean over mask tokens), plus the MoE aux loss.
    Returns ``(loss, ce, aux)``."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, X, Y, loss_mask, loss_weights=None):
        base = unwrap(self.lm)
        out = base.model(input_ids=X)
        labels = Y.masked_fill(loss_mask == 0, -100).flatten()
        w = None if loss_weights is None else loss_weights.flatten()
        ce = fused_linear_cross_entropy(out.last_hidden_state.flatten(0, 1), base.lm_head.weight, labels,
                                        loss_weights=w)
        aux = out.aux_loss
        return ce + aux, ce.detach(), aux.detach()


# ---------------------------------------------------------------------------- the trainer
class MiniMindTrainer(Trainer):
    """Base of the MiniMind stages. Subclasses set ``stage``, ``config_class``, ``data_kind``
    (``"pretrain"`` text / ``"sft"`` / ``"reason"`` conversations) and ``wandb_name``, and
    override ``loss`` (and ``build_model`` / ``save_weights`` where they differ); a stage's
    demo preset is its row of ``STAGE_DEMOS``."""

    stage = "pretrain"
    config_class = MiniMindArgs
    data_kind = "pretrain"
    wandb_name = "Pretrain"

    def __init__(self, cfg: MiniMindArgs, demo: bool = False, rows=None, save_weights: bool = True):
        if cfg.output_dir is None:
            cfg = cfg.replace(output_dir=str(pathlib.Path(cfg.save_dir).parent / "checkpoints" / cfg.stem))
        if cfg.from_resume and cfg.resume_from_checkpoint is None:
            cfg = cfg.replace(resume_from_checkpoint="latest")
        if cfg.bf16 is None:  # --dtype: autocast on CUDA only (MiniMind's autocast is CUDA-only)
            cfg = cfg.replace(bf16=None if cfg.dtype != "float32" else False)
        super().__init__(cfg)
        self.name = f"minimind-{self.stage}"
        self.demo, self.rows, self.write_weights, self.wandb_id = demo, rows, save_weights, None

    # ---------------------------------------------------------------- data
    def setup(self):
        c = self.cfg
        if c.dtype == "float16" and self.device.type == "cuda":
            self.print("--dtype float16: the loop runs bf16 autocast (no GradScaler)")
        self.tok = load_tokenizer(c.tokenizer)
        if self.rank == 0 and self.write_weights:  # a killed export's temporary (this run's file only)
            w = self.weights_file()
            for p in w.parent.glob(f".{w.name}.tmp-*"):
                p.unlink(missing_ok=True)
        if self.rows is None:
            self.rows = self.load_rows()
        self.stream = SampleStream(self.rows, c.seed)

    def load_rows(self) -> list:
        c = self.cfg
        field = "text" if self.data_kind == "pretrain" else "conversations"
        if c.data_path == DEMO:
            return [r[field] for r in mmdata.gsm8k_rows(self.data_kind, "train")]
        return mmdata.read_jsonl(c.data_path, field)

    def encode(self, items) -> dict:
        c = self.cfg
        if self.data_kind == "pretrain":
            b = mmdata.encode_pretrain(self.tok, items, c.max_seq_len)
        else:
            b = mmdata.encode_sft(self.tok, items, c.max_seq_len)
        if not c.use_moe:  # right padding, causal model: the cut columns change no loss (MoE aux counts them)
            b = mmdata.trim_padding(b)
        return {k: v.to(self.device) for k, v in b.items()}

    def num_train_items(self):
        return len(self.rows)

    def batches(self, step):
        B = self.cfg.per_device_train_batch_size
        return [self.encode(self.micro_items(self.stream, step, m, B))
                for m in range(self.cfg.gradient_accumulation_steps)]

    # ---------------------------------------------------------------- model
    @classmethod
    def weight_dir_of(cls, cfg) -> pathlib.Path:
        """Where ``--from_weight`` names are looked up (MiniMind: the weights folder)."""
        return pathlib.Path(cfg.save_dir)

    @classmethod
    def required_weights(cls, cfg) -> list:
        """(flag, name, path) of the weight files a run of ``cfg`` loads."""
        if cfg.from_weight == "none":
            return []
        return [("--from_weight", cfg.from_weight,
                 weight_path(cfg.from_weight, cls.weight_dir_of(cfg), cfg.hidden_size, cfg.use_moe))]

    def new_lm(self, hidden_size=None, num_layers=None):
        return MiniMindForCausalLM(model_config(self.cfg, hidden_size, num_layers))

    def init_lm(self, name: str, flag: str = "--from_weight", hidden_size=None, num_layers=None):
        """A MiniMind model of this config (or the given size) on the device, from weights
        ``name`` ('none': random); in the demo a missing file means a short warm-up."""
        c = self.cfg
        hidden_size, num_layers = hidden_size or c.hidden_size, num_layers or c.num_hidden_layers
        lm = self.new_lm(hidden_size, num_layers)
        if name != "none":
            path = weight_path(name, self.weight_dir_of(c), hidden_size, c.use_moe)
            if path.is_file():
                load_weights(lm, path, flag)
                self.print(f"{flag} {path}")
            elif self.demo:
                self.print(f"{flag}: no {path} here; starting from a {WARMUP_STEPS}-step pretraining warm-up instead")
                lm = warmup_lm(c, hidden_size, num_layers)
            else:
                raise missing_weight_error(flag, name, path)
        return lm.to(self.device)

    def build_model(self):
        self.lm = self.init_lm(self.cfg.from_weight)
        return LMLoss(self.lm)

    def optimizer_groups(self, module):
        # MiniMind: AdamW(model.parameters(), lr) -> torch's weight decay 0.01 on every parameter
        return [dict(params=[p for p in module.parameters() if p.requires_grad], weight_decay=self.cfg.weight_decay)]

    # ---------------------------------------------------------------- loss (pretrain / SFT / LoRA)
    def loss(self, b):
        loss, ce, aux = self.model(b["X"], b["Y"], b["loss_mask"])
        return loss, {"ce": ce, "aux": aux}

    # ---------------------------------------------------------------- weights, logging, wandb
    def weights_file(self) -> pathlib.Path:
        c = self.cfg
        return checkpoint_name(c.save_weight, c.hidden_size, bool(c.use_moe), c.save_dir)

    def save_weights(self) -> pathlib.Path:
        """Rank 0: the MiniMind ``.pth`` (fp16, MiniMind's key names)."""
        return save_pth(self.lm, self.weights_file())

    def save(self, step, guard):
        path = super().save(step, guard)
        if self.write_weights and self.rank == 0:
            self.save_weights()
        return path

    def on_train_end(self, result):
        if self.write_weights:
            result["weights"] = str(self.weights_file())
            self.print(f"weights {result['weights']}; checkpoint {result['checkpoint']}")
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # the .pth is on disk for every rank
        return result

    def log_line(self, row):
        epoch = row["step"] * self.items_per_step() / max(1, len(self.rows))
        return (f"epoch {epoch:.2f} ({row['step']}/{self.total}) loss:{row['loss']:.4f} ce:{row.get('ce', 0):.4f} "
                f"aux:{row.get('aux', 0):.4f} lr:{row['lr']:.3e} {row['step_s']:.2f}s/step")

    def state_dict(self):
        return {"wandb_id": self.wandb_id}

    def load_state_dict(self, state):
        self.wandb_id = state.get("wandb_id")

    def init_wandb(self):
        c = self.cfg
        if not c.use_wandb:
            return None
        try:
            import wandb
        except ImportError:
            self.print("--use_wandb: wandb is not installed (pip install wandb); metrics go to metrics.jsonl only")
            return None
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        name = f"MiniMind-{self.wandb_name}-Epoch-{c.num_train_epochs:g}-BatchSize-{c.batch_size}-LearningRate-{c.lr:g}"
        try:
            run = wandb.init(project=c.wandb_project, name=name, config=c.to_dict(), mode=mode, dir=str(self.out),
                             id=self.wandb_id, resume="allow" if self.wandb_id else None)
        except Exception as e:  # never fail the run over logging
            self.print(f"--use_wandb: wandb.init failed ({type(e).__name__}: {e}); metrics.jsonl only")
            return None
        self.wandb_id = getattr(run, "id", None)
        return wandb


def warmup_lm(cfg: MiniMindArgs, hidden_size: int, num_layers: int, steps: int = WARMUP_STEPS):
    """The demo's stand-in for missing weights: ``steps`` of pretraining on the GSM8K text
    (``MiniMindTrainer`` itself is the pretraining stage; ``pretrain.py`` only names it)."""
    names = {f.name for f in dataclasses.fields(MiniMindArgs)}
    base = {k: v for k, v in cfg.to_dict().items() if k in names}
    wcfg = MiniMindArgs(**{**base, **dict(hidden_size=hidden_size, num_hidden_layers=num_layers, from_weight="none",
                                          from_resume=0, resume_from_checkpoint=None, data_path=DEMO, max_steps=steps,
                                          lr=2e-3, logging_steps=0, save_steps=0, use_wandb=False,
                                          gradient_accumulation_steps=1, save_weight="warmup",
                                          output_dir=str(pathlib.Path(cfg.output_dir or "checkpoints") /
                                                         f"warmup_{hidden_size}"))})
    trainer = MiniMindTrainer(wcfg, demo=True, save_weights=False)
    trainer.fit()
    return trainer.lm


# ---------------------------------------------------------------------------- command line
cli_of = console_entry  # a stage's console script: the trainers' one entry-point wrapper


def run_stage(trainer_cls, cfg: MiniMindArgs):
    """Run a stage from its config: the demo preset when it is a demo, a missing
    ``--from_weight`` reported before any work, then ``fit``."""
    demo = is_demo(cfg)
    tag = f"[minimind {trainer_cls.stage}]"
    if demo:
        if cfg.data_path != DEMO:
            print(f"{tag} no {cfg.data_path}: running the embedded demo (small model, the shipped GSM8K "
                  f"sample); pass --data_path to train on MiniMind data", flush=True)
        cfg = cfg.with_preset({**DEMO_PRESET, **demo_preset(*STAGE_DEMOS[trainer_cls.stage], cfg.full)})
    elif cfg.full:
        trainer_cls.config_class.build_parser().error("--full: only for the demo (no --data_path)")
    else:
        for flag, name, path in trainer_cls.required_weights(cfg):
            if not path.is_file():  # before anything is built or a folder made, as an argparse error
                cfg.build_parser().error(str(missing_weight_error(flag, name, path)))
    return trainer_cls(cfg, demo=demo).fit()


def stage_main(trainer_cls, doc: str):
    """``main(argv)`` of a stage: parse MiniMind's flags, then ``run_stage``."""

    def main(argv=None, *, cfg=None):  # cfg: already parsed (latentfast-minimind parses before this module loads)
        return run_stage(trainer_cls, cfg if cfg is not None else trainer_cls.config_class.parse(argv, doc))

    return main


__all__ = ["DEMO", "DEMO_PRESET", "STAGE_DEMOS", "LMLoss", "MiniMindArgs", "MiniMindTrainer", "cli_of", "is_demo", "load_weights",
           "missing_weight_error", "model_config", "run_stage", "script_defaults", "stage_main", "warmup_lm", "weight_path"]
