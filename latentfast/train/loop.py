"""The one training loop under every trainer (HRPO, CODI, KV distillation, SFT, MiniMind, ...).

``Trainer.fit`` reads top to bottom like nanoGPT's ``train.py``:

    set-up    torchrun DDP (gloo on CPU, nccl on CUDA) or --fsdp FSDP2; device; bf16 autocast; seeds
    model     build_model(); wrap (DDP / FSDP2); optimizer_groups() -> make_optimizer(); the schedule
              (linear warm-up, then cosine / linear / constant; or MiniMind's lr*(0.1+0.45(1+cos)))
    folder    run.lock (one run per --output_dir), stale temporaries removed
    resume    --resume_from_checkpoint PATH | latest (the newest intact, verified checkpoint): its saved
              run-defining flags must match (--allow_config_change); weights, optimizer, schedule, RNG,
              trainer state, the data position; metrics.jsonl cut back to the resumed step
    each step micro = batches(step)                   one item per micro-batch (HRPO: rollouts here)
              loss(mb) -> (loss, metrics); backward(loss * weight); DDP syncs on the last micro-batch only
              clip; the non-finite guard (a NaN/Inf loss or grad norm skips the step); optimizer + schedule
              metrics averaged over ranks -> metrics.jsonl (+ wandb), the tqdm bar, a console line
              evaluate() every --eval_steps; a checkpoint every --save_steps
    end       final checkpoint, evaluate(), on_train_end(); process-group teardown (if fit set it up)

A trainer is a subclass of ``Trainer`` with a config (a subclass of ``TrainConfig``)
that overrides the hooks below; only ``build_model``, ``batches`` and ``loss`` are
required, see ``latentfast/train/sft.py`` for a complete one in a page.

Hooks (called in this order; ``self.cfg`` is the config):

    setup()                      after the device / process group exist: tokenizer, data, frozen models
    build_model() -> nn.Module   the trainable module, on ``self.device`` (the loop seeds torch first)
    fsdp_layers(module) -> list  modules FSDP2 shards before the root (default: the decoder blocks)
    optimizer_groups(module)     param groups (default: decay for dim >= 2, none for biases / norms)
    make_optimizer(groups)       default ``AdamW(groups, lr=cfg.lr)``
    num_train_items() -> int     examples per epoch: with ``items_per_step`` turns epochs into steps
    items_per_step() -> int      default per_device_train_batch_size * gradient_accumulation_steps * world
    batches(step) -> sequence    the micro-batches of ``step`` (this rank's share); any object ``loss`` takes.
                                 A generator is fine too (one micro-batch alive at a time, e.g. a frozen
                                 teacher's outputs): it must yield gradient_accumulation_steps items
    micro_weights(micro)         backward weight per micro-batch (default 1/n; token-weighted or 1 for
                                 losses normalised over the whole step); the logged ``loss`` uses them too
    loss(batch) -> (loss, dict)  under autocast, in train mode. Call ``self.model(...)`` (the wrapped module)
                                 so DDP / FSDP see the forward; metrics are scalars (tensors or floats)
    before_optimizer_step()      after the backward passes, before clipping and the step (e.g. clip parts apart)
    step_metrics(row)            add to / adjust a step's metrics row before it is logged
    evaluate(step) -> dict       held-out metrics (every rank calls it: collective); default none.
                                 ``eval_at_start = True`` also runs it before the first step
    log_line(row) -> str         the console line every --logging_steps (default: loss and lr)
    progress(row) -> dict        the tqdm bar's postfix
    state_dict() / load_state_dict(d)   the trainer's own resumable state (JSON-able), in trainer_state.json
    rank_state() -> (tensors, meta) | None / load_rank_state(tensors, meta)
                                 this rank's resumable tensors (e.g. GRPO's generation buffer, made before
                                 and used after a checkpoint), in rank_state_<rank>.safetensors (meta: JSON)
    init_wandb() -> module|None  rank 0, after resume: the wandb to log to (default: --wandb_project set)
    checkpoint_extra() -> dict   more JSON-able entries for trainer_state.json's ``extra`` (e.g. what an
                                 evaluation entrypoint needs to rebuild the model)
    on_train_end(result) -> dict after the final checkpoint and evaluation (save_pretrained, summaries)

What the loop provides to the hooks: ``self.device``, ``self.rank``, ``self.world``,
``self.amp`` (a context factory: ``with self.amp(): ...``), ``self.module`` (unwrapped),
``self.model`` (wrapped), ``self.optimizer``, ``self.scheduler``, ``self.total``,
``self.out`` (output dir), ``self.record(row)`` (metrics file + wandb),
``self.micro_items(stream, step, m, n)`` (this rank's ``n`` items of micro-batch ``m``; ``self.micro_start``
its first stream index).

Gradient accumulation: the micro-batches' weighted losses add up to the step's loss, so
with equal weights ``gradient_accumulation_steps=k`` at batch ``b`` equals one batch
``k*b`` (``tests/test_loop.py``). The non-finite guard is ``runtime.guard``; a skipped step
leaves weights, optimizer and schedule untouched and counts ``skipped_nonfinite``.
"""
from __future__ import annotations

import json
import pathlib
import random
import time

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from latentfast import files
from latentfast.runtime import checkpoint, dist
from latentfast.runtime.device import amp_context, peak_mem_mb, reset_peak_mem
from latentfast.runtime.guard import NonFiniteGuard
from latentfast.runtime.runlock import RunLock

from . import resume
from .common import JsonlLogger, no_sync_unless, optimizer_step, warmup_schedule
from .config import PlanFlagError, TrainConfig  # noqa: F401  (TrainConfig: defined with the other configs, torch-free)


def decay_groups(named_params, weight_decay: float, **extra) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on biases / norms / vectors."""
    named = [(n, p) for n, p in named_params if p.requires_grad]
    groups = [dict(params=[p for _, p in named if p.dim() >= 2], weight_decay=weight_decay, **extra),
              dict(params=[p for _, p in named if p.dim() < 2], weight_decay=0.0, **extra)]
    return [g for g in groups if g["params"]]


def truncate_metrics(path: pathlib.Path, step: int) -> None:
    """Drop the rows after ``step`` (a resumed run redoes those steps and logs them again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            s = json.loads(line).get("step")
        except (ValueError, AttributeError):
            continue  # a line cut short by a kill
        if s is None or s <= step:
            keep.append(line)
    files.write_text(path, "".join(line + "\n" for line in keep))


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


class Trainer:
    """Subclass and override the hooks (module docstring); ``fit()`` runs the loop."""

    name = "train"          # progress-bar / console tag
    resume_fields = resume.RUN_DEFINING  # config fields a resumed run must share with its checkpoint
    eval_at_start = False   # also evaluate before the first step
    save_full = False       # checkpoints hold the full model (default: trainable parameters only)

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.model = self.module = self.optimizer = self.scheduler = None

    # ------------------------------------------------------------------ hooks (defaults)
    def setup(self) -> None:
        pass

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def fsdp_layers(self, module) -> list:
        from latentfast.hf.adapter import decoder_layers

        try:
            return list(decoder_layers(module))
        except TypeError:
            return []

    def optimizer_groups(self, module) -> list[dict]:
        return decay_groups(module.named_parameters(), self.cfg.weight_decay)

    def make_optimizer(self, groups) -> torch.optim.Optimizer:
        return torch.optim.AdamW(groups, lr=self.cfg.lr)

    def num_train_items(self) -> int:
        raise NotImplementedError("set --max_steps, or override num_train_items() to train for epochs")

    def items_per_step(self) -> int:
        c = self.cfg
        return c.per_device_train_batch_size * c.gradient_accumulation_steps * self.world

    def total_steps(self) -> int:
        if self.cfg.max_steps > 0:
            return self.cfg.max_steps
        return max(1, int(self.cfg.num_train_epochs * self.num_train_items() / self.items_per_step()))

    def batches(self, step: int):
        raise NotImplementedError

    def micro_weights(self, micro) -> list[float]:
        return [1.0 / len(micro)] * len(micro)

    def loss(self, batch):
        raise NotImplementedError

    def step_metrics(self, row: dict) -> None:
        pass

    def evaluate(self, step: int) -> dict:
        return {}

    def log_line(self, row: dict) -> str:
        return f"Step {row['step']}: loss={row['loss']:.4f} lr={row['lr']:.2e}"

    def progress(self, row: dict) -> dict:
        return {"loss": f"{row['loss']:.3f}"}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def rank_state(self):
        return None

    def load_rank_state(self, tensors: dict, meta: dict) -> None:
        raise NotImplementedError(f"{type(self).__name__} saved a rank_state but cannot load one")

    def checkpoint_extra(self) -> dict:
        return {}

    def on_train_end(self, result: dict) -> dict:
        return result

    def before_optimizer_step(self) -> None:
        pass

    def init_wandb(self):
        """Rank 0, after resume: the initialised ``wandb`` module to log to, or None (default:
        wandb when --wandb_project is set)."""
        if not self.cfg.wandb_project:
            return None
        import wandb

        wandb.init(project=self.cfg.wandb_project, config=self.cfg.to_dict())
        return wandb

    # ------------------------------------------------------------------ helpers for hooks
    def micro_items(self, stream, step: int, m: int, n: int) -> list:
        """This rank's ``n`` items of micro-batch ``m`` of ``step`` from an indexable stream
        (``common.SampleStream``): every (step, micro-batch, rank) reads its own slice, so a
        resumed or re-sharded run reads the same examples."""
        base = self.micro_start(step, m, n)
        return [stream[base + i] for i in range(n)]

    def micro_start(self, step: int, m: int, n: int) -> int:
        """Stream index of this rank's first item of micro-batch ``m`` of ``step`` (``n`` items each)."""
        return getattr(self, "_stream_offset", 0) + \
            ((step * self.cfg.gradient_accumulation_steps + m) * self.world + self.rank) * n

    def record(self, row: dict) -> None:
        self._log.log({**row, "run_id": self.run_id})
        if self._wandb is not None:
            self._wandb.log(row, step=row.get("step"))

    def print(self, msg: str) -> None:
        if self.rank == 0:
            tqdm.write(f"[{self.name}] {msg}")

    def shape_hint(self) -> str:
        """The flags of this trainer that decide which parameters exist (for a mismatch error)."""
        names = [n for n in resume.MODEL_SHAPE if n in self.cfg.to_dict()]
        return " / ".join(f"--{n}" for n in names) or "model"

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        cfg = self.cfg
        if getattr(cfg, "plan", False):  # the planner runs a step on fake tensors; it never calls fit
            raise PlanFlagError("--plan: the plan of these flags is printed by the console script "
                                "(latentfast-<trainer> --plan ..., latentfast-minimind <stage> --plan ...) or "
                                "latentfast-plan; python -m latentfast.train.<x> only trains")
        owns_group = not torch.distributed.is_initialized()
        self.device, self.rank, self.world = dist.setup(cfg.device, getattr(cfg, "ddp_timeout", None))
        self.out = pathlib.Path(cfg.output_dir)
        self._lock = self._take_folder()
        try:
            return self._fit(owns_group)
        finally:
            self._lock.release()

    def _take_folder(self) -> RunLock:
        """Rank 0: the output folder's run lock (every rank fails if it is held), stale
        temporaries removed, the checkpoint to resume from found and its config checked."""
        lock, err = RunLock(self.out), None
        if self.rank == 0:
            try:
                lock.acquire()
                files.clean_stale_tmp(self.out)
                for ck in checkpoint.checkpoints(self.out):
                    files.clean_stale_tmp(ck)
                self._resume_path = self._find_resume()
            except Exception as e:
                err = e
        if torch.distributed.is_initialized():  # one decision for every rank
            box = [(err is None, lock.run_id, getattr(self, "_resume_path", None), None if err is None else str(err))]
            torch.distributed.broadcast_object_list(box, src=0)
            ok, lock.run_id, self._resume_path, msg = box[0]
            if not ok and err is None:
                raise RuntimeError(f"rank 0 stopped: {msg}")
        if err is not None:
            lock.release()
            raise err
        self.run_id = lock.run_id
        return lock

    def _fit(self, owns_group: bool) -> dict:
        cfg = self.cfg
        self._stream_offset = 0
        self.amp = amp_context(self.device, cfg.bf16)
        out = self.out
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.setup()

        # model, optimizer, schedule
        torch.manual_seed(cfg.seed)  # identical init on every rank
        module = self.build_model()
        self.model = dist.wrap(module, self.device, cfg.fsdp, layers=self.fsdp_layers(module) if cfg.fsdp else ())
        self.module = dist.unwrap(self.model)
        self.optimizer = self.make_optimizer(self.optimizer_groups(self.module))
        self.total = total = self.total_steps()
        self.scheduler = warmup_schedule(self.optimizer, total, cfg.warmup_ratio, cfg.lr_scheduler_type)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        guard = NonFiniteGuard(cfg.max_nonfinite_steps, name=self.name)

        # resume
        self._resumed = (None, None)
        start = self._resume(guard)
        if self.rank == 0 and start > 0:
            truncate_metrics(out / "metrics.jsonl", start)  # the steps redone are logged once
        self._log = JsonlLogger(out / "metrics.jsonl", enabled=self.rank == 0)
        self._wandb = self.init_wandb() if self.rank == 0 else None
        if self.eval_at_start:
            ev = self.evaluate(start)
            if ev:
                self.record({"step": start, **ev})

        history, bar = [], tqdm(range(start, total), desc=self.name, disable=self.rank != 0, initial=start,
                                total=total)
        for step in bar:
            self.step = step
            reset_peak_mem(self.device)
            t0 = time.perf_counter()
            step_loss, sums = self.forward_backward(self.batches(step), step)
            self.before_optimizer_step()
            with dist.named(f"step {step + 1}'s non-finite check (all_reduce)"):
                grad_norm = optimizer_step(params, self.optimizer, self.scheduler, cfg.max_grad_norm, guard=guard,
                                           loss=step_loss, step=step + 1)
            sums["loss"] = step_loss
            with dist.named(f"step {step + 1}'s metrics all_reduce"):
                row = dist.all_mean(sums, self.device)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            row.update(step=step + 1, lr=self.scheduler.get_last_lr()[0], grad_norm=float(grad_norm),
                       skipped_nonfinite=guard.skipped, step_s=time.perf_counter() - t0,
                       peak_mem_mb=peak_mem_mb(self.device))
            self.step_metrics(row)
            if cfg.eval_steps and (step + 1) % cfg.eval_steps == 0 and step + 1 < total:
                row.update(self.evaluate(step + 1))
            self.record(row)
            history.append(row)
            bar.set_postfix(**self.progress(row))
            if self.rank == 0 and cfg.logging_steps and ((step + 1) % cfg.logging_steps == 0 or step == start):
                line = self.log_line(row)
                if line:
                    tqdm.write(line)
            if cfg.save_steps and (step + 1) % cfg.save_steps == 0 and step + 1 < total:
                with dist.named(f"the checkpoint barrier at step {step + 1}"):
                    self.save(step + 1, guard)

        with dist.named(f"the final checkpoint barrier (step {total})"):
            final_ckpt = self.save(total, guard)
        final = self.evaluate(total)
        if final:
            self.record({"step": total, **final})
        self._log.close()
        result = self.on_train_end({"history": history, "final": final, "total": total, "checkpoint": final_ckpt})
        self.model = self.module = None  # DDP / FSDP state holds the process group: release it first
        if owns_group:
            dist.cleanup()
        return result

    def forward_backward(self, micro, step: int = 0) -> tuple[float, dict]:
        """One step's forward and backward over ``micro`` (``batches(step)``): ``loss`` of each
        micro-batch under autocast, backward at its weight. The loop's step and the planner's
        (``latentfast.plan``, on fake tensors) are this one method. Returns the weighted loss and
        the metrics averaged over the micro-batches."""
        if hasattr(micro, "__len__"):
            n = len(micro)
            weights = self.micro_weights(micro)
        else:  # a generator: gradient_accumulation_steps lazy micro-batches, equal weights
            n = self.cfg.gradient_accumulation_steps
            weights = [1.0 / n] * n
        self.module.train()
        step_loss, sums = 0.0, {}
        for m, mb in enumerate(micro):
            with no_sync_unless(self.model, m == n - 1), self.amp(), \
                    dist.named(f"step {step + 1}'s forward/backward (DDP / FSDP gradient collectives)"):
                loss, met = self.loss(mb)
                (loss * weights[m]).backward()
            step_loss += float(loss.detach()) * weights[m]
            for k, v in met.items():
                sums[k] = sums.get(k, 0.0) + float(v) / n
        return step_loss, sums

    # ------------------------------------------------------------------ checkpoints
    def save(self, step: int, guard: NonFiniteGuard) -> str | None:
        ckpt = self.out / f"checkpoint-{step}"
        if step == getattr(self, "_resumed", (None, None))[0] and ckpt.resolve() == self._resumed[1]:
            return str(ckpt)  # resumed here and no step since: it holds this very state (keep it intact)
        extra = {**self.checkpoint_extra(), "config": self.cfg.to_dict(), "trainer": self.state_dict(),
                 "nonfinite": guard.state_dict(), "run_id": self.run_id,
                 "items_seen": getattr(self, "_stream_offset", 0) + step * self.items_per_step()}
        path = checkpoint.save(str(self.out), step, self.model, self.optimizer, self.scheduler, extra=extra,
                               full=self.save_full, seal_now=False)
        distributed = torch.distributed.is_initialized()
        if distributed:
            torch.distributed.barrier()  # rank 0 made the folder
        ckpt.mkdir(parents=True, exist_ok=True)
        files.write_json(ckpt / f"rng_state_{self.rank}.json", rng_state())
        state = self.rank_state()
        if state is not None:  # before seal: the manifest covers it
            tensors, meta = state
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                      str(ckpt / f"rank_state_{self.rank}.safetensors"), metadata={"meta": json.dumps(meta)})
        if distributed:
            torch.distributed.barrier()  # every rank's RNG state is on disk
        if self.rank == 0:
            checkpoint.seal(ckpt)  # last: now it is a checkpoint
            if self.cfg.save_total_limit:
                checkpoint.prune(self.out, self.cfg.save_total_limit)
        return path

    def _find_resume(self) -> str | None:
        """The verified checkpoint to resume from (None: a fresh run), its config checked."""
        cfg = self.cfg
        path = checkpoint.latest(cfg.output_dir) if cfg.resume_from_checkpoint == "latest" else \
            cfg.resume_from_checkpoint
        if not path:
            return None
        if not (pathlib.Path(path) / "trainer_state.json").exists():
            raise FileNotFoundError(f"--resume_from_checkpoint: no checkpoint (trainer_state.json) at {path}")
        try:
            checkpoint.verify(path)
        except files.CorruptFileError as e:
            raise files.CorruptFileError(f"--resume_from_checkpoint {path}: {e}") from None
        saved = json.loads((pathlib.Path(path) / "trainer_state.json").read_text()).get("extra", {}).get("config")
        if saved:
            changed = resume.check_config(saved, cfg, path, self.resume_fields, cfg.allow_config_change)
            if changed:
                self.print("resuming with changed " + "; ".join(
                    f"{resume.flag_names(cfg, n)} {saved[n]!r} -> {getattr(cfg, n)!r}" for n in changed))
        return path

    def _resume(self, guard) -> int:
        path = self._resume_path
        if not path:
            return 0
        opt, sched = self.optimizer, self.scheduler
        target = [g["initial_lr"] for g in opt.param_groups]  # this run's lrs win (e.g. a stage-2 unfreeze)
        saved = json.loads((pathlib.Path(path) / "trainer_state.json").read_text())
        same_groups = len(saved["param_groups"]) == len(opt.param_groups)
        state = checkpoint.load(path, self.model, opt if same_groups else None, sched, hint=self.shape_hint(),
                                verified=True)  # by _find_resume
        sched.base_lrs = target
        for g, lr in zip(opt.param_groups, target):
            g["initial_lr"], g["lr"] = lr, lr * sched.lr_lambdas[0](sched.last_epoch)
        extra = state.get("extra", {})
        guard.load_state_dict(extra.get("nonfinite", {}))
        self.load_state_dict(extra.get("trainer", {}))
        rng = pathlib.Path(path) / f"rng_state_{self.rank}.json"
        if rng.exists():
            set_rng_state(json.loads(rng.read_text()))
        rs = pathlib.Path(path) / f"rank_state_{self.rank}.safetensors"
        if rs.exists():
            with safe_open(str(rs), "pt", device="cpu") as f:
                tensors = {k: f.get_tensor(k).to(self.device) for k in f.keys()}
                meta = json.loads((f.metadata() or {}).get("meta", "{}"))
            self.load_rank_state(tensors, meta)
        note = "" if same_groups else " (optimizer groups changed: fresh optimizer state)"
        self.print(f"resumed from {path} at step {state['step']}{note}")
        self._resumed = (state["step"], pathlib.Path(path).resolve())
        self._stream_offset = resume.stream_offset(extra.get("items_seen"), state["step"], self.items_per_step())
        return state["step"]


__all__ = ["TrainConfig", "Trainer", "decay_groups", "truncate_metrics"]
