"""``plan(workload, device)``: the step's peak memory by category, whether it fits, and a
roofline step time -- measured on fake tensors (``latentfast.plan.fake``) -- plus, when it does
not fit, the changes that would make it fit, each with its own predicted peak."""
from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import torch

from . import devices as D
from .fake import CHUNK_KEY, _Tracker, categories, fake_mode, gib, nbytes, repeated_decode_steps, roofline_seconds
from .models import kv_bytes_per_token
from . import harness as H
from .steps import Built, StepRunner, Workload, balanced_moe, build, init_optimizer_state
from .trainers import Unsupported, has_trainer, trainer_for

PHASES = ("rollout", "train", "optimizer")


@dataclass
class Plan:
    workload: Workload
    device: D.Device
    peak_bytes: int  # allocator peak (tensors), the largest phase
    peak_phase: str
    breakdown: dict  # category -> bytes at the peak
    phase_peaks: dict  # phase -> bytes
    flops: dict  # phase -> FLOPs (train: one micro-batch)
    step_s: float
    time_parts: dict
    params: int
    trainable: int
    build_s: float = 0.0
    run_s: float = 0.0
    stats: dict = field(default_factory=dict)  # what step_time needs (other devices)
    options: list = field(default_factory=list)  # (label, peak_bytes, fits)

    @property
    def needed_bytes(self) -> int:
        """Allocator peak + the rounding/fragmentation reserve (the CUDA context is outside)."""
        return int(self.peak_bytes * (1 + D.ALLOCATOR_OVERHEAD))

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.device.usable_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.device.usable_bytes - self.needed_bytes


def _runner_phase(tracker):
    return tracker.in_phase


def measure(w: Workload, device_type: str = "cuda", fake: bool = True):
    """Build and run ``w``'s step; returns (tracker, built, flops per phase, build s, run s).
    The trainer's own step (``harness``, ``trainers``) for ``impl="latentfast"``;
    else the step of ``steps`` (the peers' way)."""
    if has_trainer(w):
        return measure_trainer(w, device_type, fake)
    ctx = fake_mode() if fake else contextlib.nullcontext()
    t0 = time.perf_counter()
    with ctx as mode, (balanced_moe() if fake else contextlib.nullcontext()):
        b = build(w, mode)
        init_optimizer_state(b)
        t1 = time.perf_counter()
        tracker = _Tracker(device_type)
        mods = [b.model] + ([b.extra] if b.extra is not None else []) + b.frozen
        tracker.track_external(*mods, *b.optimizers)
        with tracker:
            StepRunner(w, b, _runner_phase(tracker), device_type).run()
        flops = tracker.flops
    return tracker, b, flops, t1 - t0, time.perf_counter() - t1


def measure_trainer(w: Workload, device_type: str = "cuda", fake: bool = True):
    """``measure`` of the trainer's own step: set up, built and run through its hooks."""
    workdir = tempfile.mkdtemp(prefix="latentfast-plan-")
    try:
        t0 = time.perf_counter()
        # the trainer's own set-up talks (demo banners, notes): a plan prints only the plan
        with (fake_mode() if fake else contextlib.nullcontext()) as mode, contextlib.redirect_stdout(io.StringIO()), \
                (balanced_moe() if fake else contextlib.nullcontext()):
            loader = H.PlanLoader(mode, H.response_tokens(w))
            with H.substituted(loader):
                trainer, bf16 = trainer_for(w, workdir, device_type)
            H.prepare(trainer, loader, bf16, workdir)
            main, others = H.modules(trainer)
            opts = [trainer.optimizer, *H.extra_optimizers(trainer)]
            with (mode if mode is not None else contextlib.nullcontext()):
                H.init_optimizer_state(opts)
            b = Built(main, None, others, opts, H.main_config(trainer))
            if w.rl:  # the rollout: one generation round's rows, prompt + completion tokens
                b.rollout = (H.rollout_rows(trainer), w.prompt_len + w.completion_len)
            t1 = time.perf_counter()
            tracker = _Tracker(device_type)
            tracker.track_external(main, *others, *opts)
            with tracker, repeated_decode_steps(tracker):
                H.run_step(trainer, tracker.in_phase, "rollout" if w.rl else "data")
        return tracker, b, tracker.flops, t1 - t0, time.perf_counter() - t1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


POOL_KEY = "rollout pool"


def add_rollout_pool(peaks: dict, b: Built) -> dict:
    """On CUDA the decode step is compiled and its buffers stay in the engine's pool between
    rollouts (``generation.engine.BufferPool``): the static KV cache (``cache_len`` rounds the
    length up to a bucket) and the sampling noise. The fake step runs the eager engine on the CPU,
    which frees them after the rollout; here they are added to the later phases."""
    from latentfast.generation.cache import cache_len

    rows, n = b.rollout
    pool = rows * cache_len(n, bucketed=True) * kv_bytes_per_token(b.cfg, 2) + rows * b.cfg.vocab_size * 4
    out = {}
    for ph, snap in peaks.items():
        snap = dict(snap)
        if ph != "rollout":
            snap[POOL_KEY] = pool
            snap["Total"] = snap["Total"] + pool
        out[ph] = snap
    return out


def _split(snap: dict, b: Built, w: Workload, phase: str, keep_cache: bool) -> dict:
    """MemTracker's categories at the peak, with the frozen models and the rollout cache named."""
    cat = categories(snap)
    out = {}
    trained = {id(p) for p in b.model.parameters()}
    frozen = nbytes({id(p): p for m in b.frozen for p in m.parameters() if id(p) not in trained}.values())
    params = cat.pop("Parameter", 0) + cat.pop("Buffer", 0)
    out["weights (trained model)"] = params - frozen
    if frozen:
        out["frozen models (ref / teacher / reward)"] = frozen
    out["gradients"] = cat.pop("Gradient", 0)
    out["optimizer state"] = cat.pop("Optstate", 0)
    act = cat.pop("Activation", 0) + cat.pop("Temp", 0) + cat.pop("Other", 0)
    act += cat.pop(POOL_KEY, 0)
    if w.rl and (phase == "rollout" or keep_cache):
        rows, n = b.rollout or (w.micro_batch, w.prompt_len + w.completion_len)
        kv = rows * n * kv_bytes_per_token(b.cfg, 2)
        out["rollout KV cache"] = kv
        act -= kv
    out["activations + temporaries"] = act
    if cat.get(CHUNK_KEY):
        out["lm_head chunk (fused op workspace)"] = cat.pop(CHUNK_KEY)
    cat.pop("Total", None)
    return {k: v for k, v in out.items() if v}


def step_stats(w: Workload, b: Built) -> dict:
    """What the roofline needs from the built step (kept on the plan)."""
    lora_or_bf16 = w.lora_rank > 0 or not w.bf16
    return {"weight_bytes": nbytes(b.model.parameters()) // (1 if lora_or_bf16 else 2),  # bf16 reads
            "active": sum(p.numel() for n, p in b.model.named_parameters() if "embed" not in n),
            "kv_per_token": kv_bytes_per_token(b.cfg, 2),
            "opt_bytes": sum(nbytes(g["params"]) * 4 for o in b.optimizers for g in o.param_groups)}


def step_time(w: Workload, st: dict, flops: dict, dev: D.Device) -> dict:
    """Roofline seconds per phase: compute at COMPUTE_EFFICIENCY x peak, memory traffic at
    BANDWIDTH_EFFICIENCY x bandwidth, the larger of the two (decode: per token)."""
    peak, bw = dev.bf16_flops * D.COMPUTE_EFFICIENCY, dev.bandwidth * D.BANDWIDTH_EFFICIENCY
    if st.get("ops"):  # a trainer's own step: RuntimeEstimator's per-op roofline over every op it ran
        names = {"rollout": "rollout (decode, rewards, reference)", "data": "data", "train": "train fwd+bwd",
                 "optimizer": "optimizer"}
        return {names.get(ph, ph): roofline_seconds(ops, peak, bw) for ph, ops in st["ops"].items()}
    n_micro = min(w.grad_accum, w.max_micro_measured)
    parts = {}
    if w.rl:
        decode = 0.0
        for k in range(w.completion_len):  # one token per sequence per step; dense attention reads the cache
            byts = st["weight_bytes"] + w.micro_batch * (w.prompt_len + k) * st["kv_per_token"]
            decode += max(2 * st["active"] * w.micro_batch / peak, byts / bw)
        parts["rollout decode"] = decode * w.grad_accum
        parts["rollout prefill + ref"] = flops.get("rollout", 0.0) * w.grad_accum / peak  # one measured
    parts["train fwd+bwd"] = flops.get("train", 0.0) / n_micro * w.grad_accum / peak
    parts["optimizer"] = 2 * st["opt_bytes"] / bw  # weights, grads, two states: read + write
    return parts


def plan(w: Workload, dev: D.Device, options: bool = True, fake: bool = True) -> Plan:
    tracker, b, flops, build_s, run_s = measure(w, "cuda", fake)
    runner_keep = w.keep_rollout_cache if w.keep_rollout_cache is not None else w.impl == "latentfast"
    peaks = {k: v for k, v in tracker.phase_peaks.items()}
    if b.rollout and runner_keep:
        peaks = add_rollout_pool(peaks, b)
    phase = max(peaks, key=lambda k: peaks[k]["Total"])
    snap = peaks[phase]
    stats = step_stats(w, b)
    if has_trainer(w):
        stats["ops"] = tracker.ops
    parts = step_time(w, stats, flops, dev)
    p = Plan(w, dev, int(snap["Total"]), phase, _split(snap, b, w, phase, w.rl and runner_keep),
             {k: int(v["Total"]) for k, v in peaks.items()}, flops, sum(parts.values()), parts,
             sum(x.numel() for x in b.model.parameters()),
             sum(x.numel() for o in b.optimizers for g in o.param_groups for x in g["params"]), build_s, run_s,
             stats=stats)
    if options and not p.fits:
        p.options = fit_options(p)
    return p


def fsdp_peak(p: Plan, n: int) -> int:
    """FSDP over ``n`` GPUs (analytic): weights, gradients and optimizer state sharded 1/n, plus
    two decoder layers' unsharded weights and gradients in flight (all-gather + prefetch)."""
    br = p.breakdown
    sharded = sum(br.get(k, 0) for k in ("weights (trained model)", "gradients", "optimizer state"))
    per_layer = br.get("weights (trained model)", 0) / max(1, _n_layers(p))
    return int(p.peak_bytes - sharded + sharded / n + 4 * per_layer)


def _n_layers(p: Plan) -> int:
    from .models import hf_config

    return hf_config(p.workload.model).num_hidden_layers


def fit_options(p: Plan) -> list:
    """Changes that would make the step fit, each planned again (FSDP: analytic)."""
    w, out = p.workload, []
    tries = []
    if not w.grad_ckpt:
        tries.append(("gradient checkpointing", w.replace(grad_ckpt=True)))
    if w.lora_rank == 0 and w.family not in ("distill", "kv"):  # (a trainer without LoRA: Unsupported)
        tries.append(("LoRA r16 (base frozen in bf16)", w.replace(lora_rank=16)))
    if w.impl == "recipe":
        tries.append(("latentfast's fused lm_head losses", w.replace(impl="latentfast")))
    mb = w.micro_batch // 2
    if mb >= 1:
        tries.append((f"micro-batch {mb} (x{2 * w.grad_accum} accumulation)",
                      w.replace(micro_batch=mb, grad_accum=w.grad_accum * 2)))
    if w.impl == "latentfast":
        tries.append(("loss chunk 1024 rows", w.replace(chunk_rows=1024)))
    for label, w2 in tries:
        try:
            q = plan(w2, p.device, options=False)
            out.append((label, q.needed_bytes, q.fits))
        except Unsupported:  # the trainer has no such switch: not an option
            continue
        except Exception as e:  # an option that cannot be planned is reported, not fatal
            out.append((label + f" (not planned: {type(e).__name__})", -1, False))
    for n in (2, 4, 8):
        need = int(fsdp_peak(p, n) * (1 + D.ALLOCATOR_OVERHEAD))
        out.append((f"FSDP over {n} GPUs (analytic)", need, need <= p.device.usable_bytes))
    return out


def format_plan(p: Plan) -> str:
    w, dev = p.workload, p.device
    g = lambda b: f"{gib(b):7.2f} GiB"  # noqa: E731
    shape = (f"{w.micro_batch} seqs x ({w.prompt_len} + {w.completion_len}) tokens" if w.rl
             else f"{w.micro_batch} seqs x {w.completion_len} tokens")
    from .models import label

    trainer = "" if w.trainer == w.family else f", trainer {w.trainer}"  # e.g. grpo family, minimind_spo
    lines = [f"plan: {w.family} ({w.impl}{trainer}) on {label(w.model)}: {shape}, accumulation {w.grad_accum}, "
             f"LoRA {'r' + str(w.lora_rank) if w.lora_rank else 'off (full)'}, grad checkpointing "
             f"{'on' if w.grad_ckpt else 'off'}, bf16 {'on' if w.bf16 else 'off'}"
             + (f", beta {w.beta}" if w.rl else "") + (f", teachers {[label(t) for t in w.teachers]}" if w.teachers else ""),
             f"  parameters {p.params / 1e6:.1f} M, trained {p.trainable / 1e6:.2f} M "
             f"(fake step: built {p.build_s:.1f} s, ran {p.run_s:.1f} s on this CPU; nothing allocated)",
             f"  peak memory (phase '{p.peak_phase}'), by category:"]
    for k, v in p.breakdown.items():
        lines.append(f"    {k:<40}{g(v)}")
    lines.append(f"    {'= allocator peak (tensors)':<40}{g(p.peak_bytes)}")
    lines.append(f"    {'+ allocator rounding/fragmentation':<40}{g(p.needed_bytes - p.peak_bytes)}"
                 f"  ({D.ALLOCATOR_OVERHEAD:.0%}, assumed)")
    lines.append(f"    {'+ CUDA context + cuBLAS workspaces':<40}{g(D.CUDA_CONTEXT_BYTES)}  (assumed)")
    total = p.needed_bytes + D.CUDA_CONTEXT_BYTES
    lines.append(f"  phase peaks: " + ", ".join(f"{k} {gib(v):.2f} GiB" for k, v in p.phase_peaks.items()))
    verdict = "FITS" if p.fits else "DOES NOT FIT"
    lines.append(f"  {dev.name}: needs {gib(total):.2f} of {gib(dev.memory_bytes):.2f} GiB -> {verdict} "
                 f"(headroom {gib(p.headroom_bytes):+.2f} GiB)")
    tp = ", ".join(f"{k} {v:.2f} s" for k, v in p.time_parts.items())
    how = ("per op, max(FLOPs / peak, bytes / bandwidth) as RuntimeEstimator's cost model"
           if p.stats.get("ops") else "FLOPs of the phases, analytic decode")
    lines.append(f"  roofline step time ~ {p.step_s:.2f} s ({tp}); {how}; {dev.bf16_flops / 1e12:.1f} TFLOP/s bf16 "
                 f"dense x {D.COMPUTE_EFFICIENCY:.0%} and {dev.bandwidth / 1e9:.0f} GB/s x "
                 f"{D.BANDWIDTH_EFFICIENCY:.0%} assumed ({dev.source}); a lower bound: launch/Python overhead not counted")
    if p.options:
        lines.append("  options that change the peak:")
        for label, need, fits in p.options:
            size = f"{gib(need + D.CUDA_CONTEXT_BYTES):.2f} GiB" if need >= 0 else "?"
            lines.append(f"    {label:<48}{size:>11}  {'fits' if fits else 'does not fit'}")
    return "\n".join(lines)
