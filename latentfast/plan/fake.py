"""Measuring one step on fake tensors with PyTorch's own tools.

``measure(step_fn)`` runs a step under ``FakeTensorMode`` (shapes, dtypes and strides are
real; no storage is allocated) inside ``torch.distributed._tools.mem_tracker.MemTracker``
(bytes live per category: parameters, buffers, gradients, activations, temporaries,
optimizer state), counting FLOPs per aten op with ``torch.utils.flop_counter``'s formulas.

Two things the aten-level trackers cannot see are added here, at the moment they happen:
- the fused lm_head ops (``latentfast::lm_head_*``) are opaque custom ops whose fake impls
  return only their outputs; inside they allocate an (R, V) logits chunk plus copies of the
  rows' hidden states (and the distillation op a teacher chunk). ``_Tracker`` adds that
  workspace to the live total while the op runs, under the category "lm_head chunk", with
  R as the op would choose it on the planned device type; their GEMM FLOPs are added too.
- ``MemTracker`` updates the peak of every module on every op (quadratic in practice:
  76 s instead of 8 s for a Qwen2.5-1.5B step here); ``_Tracker`` keeps the global peak only.

FakeTensorMode on ``device="cuda"``: with the CPU build of torch it fails ("not linked with
support for cuda devices"); with the CUDA build (2.14.1+cu130) and no GPU a fake forward
works but the backward fails in the autograd engine ("hasPrimaryContext expects a valid
device index"). So the step runs on fake CPU tensors and ``latentfast.plan.devices`` adds
what differs on a GPU (CUDA context, allocator rounding) explicitly.
"""
from __future__ import annotations

import contextlib
import functools
import weakref
from array import array
import math
from copy import deepcopy

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._runtime_estimation import _IGNORE_OPS, get_num_bytes
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.flop_counter import flop_registry as _FLOP_REGISTRY
from torch.utils.weak import WeakIdKeyDictionary

CHUNK_KEY = "lm_head chunk"
_UNKNOWN = object()
_ACTIVE: list = []  # the _Trackers entered (host reads of fake tensors are answered)
_A = torch.ops.aten
_STRUCTURAL = (_A.constant_pad_nd, _A.cat, _A.slice, _A.clone, _A._to_copy, _A.view, _A.reshape, _A.expand,
               _A.unsqueeze, _A.squeeze, _A.permute, _A.transpose, _A.t, _A.alias, _A.detach)
_CONVERSIONS = (_A._to_copy, _A.clone, _A.view, _A.reshape, _A.squeeze, _A.alias, _A.detach, _A.lift_fresh)
_KNOWN_NUMEL = 1 << 22  # values kept for tensors up to this size (token ids and masks of a step)


def _elt(t) -> int:
    return t.element_size() if isinstance(t, torch.Tensor) else 0


def lm_head_workspace(func, args, device_type: str, count=None) -> tuple[int, float]:
    """(bytes, FLOPs) a fused lm_head op allocates / computes inside, from its arguments.
    ``count(mask)``: the rows a token mask selects when its value is known (else None: all)."""
    from latentfast.ops.lm_head_engine import chunk_rows_default

    def rows_of(mask, default):
        n = count(mask) if (count is not None and mask is not None) else None
        return default if n is None else n

    name = str(func)
    dev = torch.device(device_type)
    if "lm_head_objective" in name:
        x, weight, mask, chunk_rows = args[0], args[1], args[4], args[10]
        need = sum(bool(a) for a in args[11:13])
        n = rows_of(mask, mask.numel())  # the real op drops the masked-out rows
        V, H = weight.shape
        rows = chunk_rows if chunk_rows > 0 else chunk_rows_default(dev, V, _elt(x))
        if args[9] > 0 and chunk_rows <= 0:  # softcap -> torch path, 1/8 of the rows
            rows = max(16, rows // 8)
        r = min(rows, n)
        work = r * V * _elt(x) + 2 * n * H * _elt(x) + 4 * n * 4
        if args[9] > 0:
            work += 8 * r * V * 4
        return work, 2.0 * n * H * V * (1 + need), _sweeps(n, r, V, H, _elt(x), 1 + need)
    if "lm_head_logp_entropy" in name:
        x, weight, chunk_rows = args[0], args[1], args[6]
        n = rows_of(args[4], x.numel() // x.shape[-1])
        V, H = weight.shape
        rows = chunk_rows if chunk_rows > 0 else chunk_rows_default(dev, V, _elt(x))
        return min(rows, n) * V * _elt(x) + n * H * _elt(x), 2.0 * n * H * V, _sweeps(n, min(rows, n), V, H, _elt(x), 1)
    if "lm_head_distill" in name:
        xs, ws, xt, wt, chunk_rows = args[0], args[1], args[3], args[4], args[9]
        n = rows_of(args[7], xs.shape[0])
        V, Vt = ws.shape[0], wt.shape[0]
        rows = chunk_rows if chunk_rows > 0 else max(16, chunk_rows_default(dev, max(V, Vt), 4) // 16)
        r = min(rows, n)
        need = sum(bool(a) for a in args[10:12])
        vjp = int(distill_vjp_units(args[8], xs.dtype, xt.dtype) * r * V * 4)
        work = r * (V * _elt(xs) + Vt * _elt(xt)) + vjp + n * (2 * xs.shape[1] * _elt(xs) + xt.shape[1] * _elt(xt))
        return work, 2.0 * n * (xs.shape[1] * V * (1 + need) + xt.shape[1] * Vt), \
            _sweeps(n, r, V, xs.shape[1], _elt(xs), 1 + need) + _sweeps(n, r, Vt, xt.shape[1], _elt(xt), 1)
    return 0, 0.0, 0


@functools.lru_cache(maxsize=None)
def distill_vjp_units(objective: str, student_dtype=torch.float32, teacher_dtype=torch.float32) -> float:
    """Peak bytes of a distillation objective's ``torch.func.vjp`` over one chunk -- the student
    logits' fp32 upcast (bf16 under autocast), the forward's temporaries (the teacher's upcast
    among them), the saved ones, the gradient -- in units of an (R, V) fp32 tensor (all its
    temporaries are (R, V) elementwise: the count does not depend on R or V), measured once per
    objective and dtypes on a small real chunk from the CPU allocator's events. The op
    (``ops.lm_head_distill``) is opaque to the tracker; MiniMind's KL (beta 0) peaks at 6 in fp32."""
    from latentfast.ops.lm_head_engine import _func_enabled, objective_from_key

    obj, r, V = objective_from_key(objective), 64, 512
    with _disable_current_modes(), torch.random.fork_rng():
        s = torch.randn(r, V).to(student_dtype)
        t, ids, n = torch.randn(r, V).to(teacher_dtype), torch.randint(0, V, (r,)), torch.tensor(float(r))

        def chunk():  # as the op runs it: the vjp over the chunk's fp32 copy, the gradient back in place
            with _func_enabled():
                _, vjp, _ = torch.func.vjp(lambda z: (lambda o: (o[0], (o[1], o[2])))(obj.terms(z, t, ids, n)),
                                           s.float(), has_aux=True)
                s.copy_(vjp(torch.ones(()))[0])

        chunk()  # one-time allocations stay out
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            chunk()
    return allocation_peak(prof) / (r * V * 4)


def allocation_peak(prof) -> int:
    """The running peak of the bytes allocated minus freed within a ``torch.profiler`` profile
    (``profile_memory=True``): every allocator event in time order."""
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.typed[0] == _EventType.Allocation:
            events.append((node.start_time_ns, node.typed[1].alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def _sweeps(n, r, V, H, elt, gemms) -> int:
    """Memory traffic of a chunked lm_head sweep: the weight read once per chunk and GEMM, the
    (r, V) logits written and read (x2 for the gradient pass)."""
    chunks = -(-n // max(r, 1))
    return chunks * gemms * V * H * elt + 2 * gemms * n * V * elt


class _NoHookHandle:
    def remove(self):
        pass


_NoHook = _NoHookHandle()


class _Tracker(MemTracker):
    """MemTracker with a global peak only, per-phase peaks, and the lm_head ops' workspace."""

    def __init__(self, device_type: str = "cuda"):
        super().__init__()
        self.device_type = device_type
        self.phase = "step"
        self.phase_peaks: dict[str, dict] = {}
        self.flops: dict[str, float] = {}
        self._seen = weakref.WeakSet()
        self._known = WeakIdKeyDictionary()
        # No module hierarchy: ModTracker's hooks register multi-grad hooks on every module's
        # inputs, which fails for inputs that require grad under no_grad (a checkpointed model's
        # rollout) and costs time; only the parameter registration of the user hook is kept.
        mt = self._mod_tracker

        def pre(mod, inputs):
            if mt._user_pre_fw_hook is not None:
                mt._user_pre_fw_hook(mod, inputs)

        mt._fw_pre_hook = pre
        mt._fw_post_hook = lambda mod, inputs, outputs: None
        self.ops: dict[str, tuple] = {}  # phase -> (FLOPs per op, bytes per op)
        self._mask_assumed = WeakIdKeyDictionary()  # boolean masks partly from unknown ones (``_assume_mask``)
        self._assume = WeakIdKeyDictionary()  # unknown booleans read on the host: their worst case

    def _consider(self, extra: int = 0):
        for dev, snap in self._curr_mem_snap.items():
            total = snap[_TOTAL_KEY] + extra
            best = self.phase_peaks.get(self.phase)
            if best is None or best[_TOTAL_KEY] < total:
                s = deepcopy(snap)
                s[CHUNK_KEY] = extra
                s[_TOTAL_KEY] = total
                self.phase_peaks[self.phase] = s

    def _update_peak_stats(self, peak_state) -> None:  # noqa: ARG002 (global peak only)
        self._consider()

    def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True):
        """MemTracker's, but no gradient hook on frozen parameters (LoRA bases, teachers):
        ``register_hook`` refuses a tensor that does not require grad."""
        frozen = [p for p in module.parameters() if not p.requires_grad
                  and self._param_to_grad_hook_handles.get(p) is None]
        for p in frozen:  # marked as hooked
            self._param_to_grad_hook_handles[p] = (_NoHook, _NoHook)
        return super()._track_module_params_and_buffers(module, install_grad_hooks)

    # Per-module statistics are not needed (and MemTracker refuses a module called twice in
    # one step, as a reference forward does): the hooks only register parameters once.
    def _pre_fw_hook(self, module, inputs) -> None:
        if module not in self._seen:
            self._seen.add(module)
            self._track_module_params_and_buffers(module, install_grad_hooks=True)

    def _post_fw_hook(self, module, inputs, outputs) -> None:
        pass

    def _pre_bw_hook(self, module, args) -> None:
        pass

    def _post_bw_hook(self, module, args) -> None:
        pass

    # --- values: the data's integer tensors (token ids, masks, labels) are known. A fake tensor
    # made from host data, or by an op whose tensor inputs are all known, keeps its real value
    # beside it (small integer / bool tensors only), so what the step reads on the host and the
    # shapes of boolean selections are exact; anything computed from the model is unknown.
    def _value(self, a):
        if isinstance(a, FakeTensor):
            return self._known.get(a, _UNKNOWN)
        return a  # host data (real tensors lifted into the fake mode), numbers, ...

    def _values(self, args, kwargs):
        flat, spec = tree_flatten((args, kwargs))
        tensors = [x for x in flat if isinstance(x, torch.Tensor)]
        vals = [self._value(x) for x in flat]
        if any(v is _UNKNOWN for v in vals):
            return None
        return tensors, tree_unflatten(vals, spec)

    def _remember(self, func, args, kwargs, out):
        got = self._values(args, kwargs)
        fakes = [x for x in tree_flatten(out)[0] if isinstance(x, FakeTensor)]
        small = all(x.numel() <= _KNOWN_NUMEL for x in fakes)
        factory = got is not None and not got[0]  # random / empty floats: nothing worth knowing
        if got is None or not fakes or not small or (factory and any(x.is_floating_point() for x in fakes)):
            for x in self._mutated(func, args):  # written from unknown values
                self._known.pop(x, None)
            return
        rargs, rkwargs = got[1]
        with _disable_current_modes():
            real = func(*rargs, **rkwargs)
        for f, r in zip(tree_flatten(out)[0], tree_flatten(real)[0]):
            if isinstance(f, FakeTensor) and isinstance(r, torch.Tensor):
                self._known[f] = r

    def _assume_mask(self, func, args, kwargs, out):
        """A boolean mask moved, padded or joined from an unknown one: its assumed value (unknown
        parts all true, known parts -- the padding -- as they are), for ``nonzero`` to count."""
        flat, spec = tree_flatten((args, kwargs))
        if not any(isinstance(x, FakeTensor) and x.dtype == torch.bool and x in self._known for x in flat) and \
                not any(isinstance(x, FakeTensor) and x in self._mask_assumed for x in flat) and \
                func._overloadpacket not in (_A.constant_pad_nd, _A.cat):
            return
        vals = []
        for x in flat:
            if isinstance(x, FakeTensor):
                v = self._known.get(x)
                v = self._mask_assumed.get(x) if v is None else v
                if v is None:
                    with _disable_current_modes():
                        v = torch.ones(x.shape, dtype=x.dtype)
                x = v
            vals.append(x)
        a, k = tree_unflatten(vals, spec)
        with _disable_current_modes():
            real = func(*a, **k)
        if isinstance(real, torch.Tensor) and real.shape == out.shape:
            self._mask_assumed[out] = real

    @staticmethod
    def _mutated(func, args):
        out = []
        for a, arg in zip(func._schema.arguments, args):
            if a.alias_info is not None and a.alias_info.is_write and isinstance(arg, FakeTensor):
                out.append(arg)
        return out

    def __enter__(self):
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *args):
        _ACTIVE.remove(self)
        return super().__exit__(*args)

    def _count_nonzero(self, mask):
        v = self._known.get(mask) if isinstance(mask, FakeTensor) else None
        if v is None:
            return None
        with _disable_current_modes():
            return int(v.count_nonzero())

    def _nonzero(self, mask):
        """``nonzero`` of a fake boolean mask: exact when its value is known, else all true --
        the planned worst case, every row a mask can select is selected."""
        v = self._known.get(mask)
        if v is None:
            v = self._mask_assumed.get(mask)
        with _disable_current_modes():  # unknown: all true (and known as such from here on)
            v = (v if v is not None else torch.ones(mask.shape, dtype=torch.bool)).nonzero()
        n = v.shape[0]
        out = super().__torch_dispatch__(torch.ops.aten.zeros.default, (), ([n, mask.dim()],),
                                         {"dtype": torch.long, "device": mask.device})
        self._known[out] = v
        return out

    def _bool_indices(self, indices):
        out = []
        for ix in indices:
            if isinstance(ix, FakeTensor) and ix.dtype == torch.bool:
                nz = self._nonzero(ix)
                parts = nz.unbind(1)
                if nz in self._known:
                    with _disable_current_modes():
                        reals = self._known[nz].unbind(1)
                    for p, r in zip(parts, reals):
                        self._known[p] = r
                out.extend(parts)
            else:
                out.append(ix)
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        aten = torch.ops.aten
        kwargs = kwargs or {}
        if func in (aten._local_scalar_dense.default, aten.is_nonzero.default) and isinstance(args[0], FakeTensor):
            v = self._known.get(args[0])
            if v is not None:
                with _disable_current_modes():
                    v = v.item()
            else:
                # a value read on the host from the model (the ops' token-id range checks on sampled
                # ids, AdamW's step count) is unknowable: 1; a boolean the worst case: an ``all`` False
                # (a rollout's "all rows done?": it runs to its full length), an ``any`` True
                v = self._assume.get(args[0], False if args[0].dtype == torch.bool else 1)
            return bool(v) if func is aten.is_nonzero.default else v
        if kwargs.get("generator") is not None:  # a seeded draw (sampling noise): its values are not planned
            kwargs = {**kwargs, "generator": None}
        if func is aten.nonzero.default and isinstance(args[0], FakeTensor):
            return self._nonzero(args[0])
        if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default) \
                and any(isinstance(i, FakeTensor) and i.dtype == torch.bool for i in args[1] if i is not None):
            args = (args[0], self._bool_indices(args[1]), *args[2:])
        if func is aten.masked_select.default and isinstance(args[1], FakeTensor):
            x, mask = torch.broadcast_tensors(args[0], args[1])
            idx = self._bool_indices([mask])
            return self.__torch_dispatch__(aten.index.Tensor, types, (x, idx))
        out = self._dispatch(func, types, args, kwargs)
        self._remember(func, args, kwargs, out)
        if isinstance(out, FakeTensor) and out.dtype == torch.bool and out not in self._known \
                and func._overloadpacket in _STRUCTURAL:
            self._assume_mask(func, args, kwargs, out)
        if isinstance(out, FakeTensor) and out.numel() == 1 and out not in self._known:
            pkt = func._overloadpacket
            if pkt in (aten.any, aten.all):
                self._assume[out] = pkt is aten.any
            elif pkt in _CONVERSIONS and isinstance(args[0], FakeTensor) and args[0] in self._assume:
                self._assume[out] = self._assume[args[0]]  # ``done.to(torch.int32)`` keeps the assumption
        return out

    def _dispatch(self, func, types, args, kwargs):
        work = flops = traffic = 0
        if str(func).startswith("latentfast."):
            work, flops, traffic = lm_head_workspace(func, args, self.device_type, self._count_nonzero)
            if work:
                self._consider(work)  # the op's inputs are live while it runs
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if work:
            self._consider(work)  # outputs and workspace together at the op's end
        counter = _FLOP_REGISTRY.get(func._overloadpacket)
        if counter is not None:
            flops += counter(*args, **(kwargs or {}), out_val=out)
        if func._overloadpacket not in _IGNORE_OPS and func.namespace != "prim":  # prim: metadata (``.device``)
            if func._overloadpacket is torch.ops.aten.embedding:  # reads the looked-up rows, not the table
                traffic += 2 * get_num_bytes(out) + get_num_bytes(args[1])
            else:
                traffic += sum(get_num_bytes(t) for t in tree_flatten((args, kwargs, out))[0]
                               if isinstance(t, torch.Tensor))
            self._count(flops, traffic)
        return out

    def _count(self, flops: float, traffic: int) -> None:
        """Per op and phase: FLOPs with torch's own formulas (``torch.utils.flop_counter``'s
        registry) and bytes read + written (``torch.utils._runtime_estimation.get_num_bytes``),
        what ``RuntimeEstimator``'s roofline model takes per op (``roofline_seconds``) -- except
        that metadata reads (``prim.device``: it counted a weight's bytes each time its device was
        asked, 29 % of a decode step's bytes) count nothing and an embedding lookup counts the rows
        it reads, not the whole table. Not
        ``FlopCounterMode`` itself: its module hooks keep activation-checkpointing's recomputed
        tensors alive through the backward (the planned peak rose, not fell); not
        ``RuntimeEstimator`` itself: its roofline asserts ``torch.cuda.is_available()``."""
        self.flops[self.phase] = self.flops.get(self.phase, 0.0) + flops
        f, b = self.ops.setdefault(self.phase, (array("d"), array("d")))
        f.append(flops)
        b.append(traffic)

    @contextlib.contextmanager
    def in_phase(self, name: str):
        old, self.phase = self.phase, name
        try:
            yield
        finally:
            self.phase = old


@contextlib.contextmanager
def fake_mode():
    """FakeTensorMode, with ``module.to(...)`` / ``.float()`` / ... working on fake parameters:
    torch's ``Module._apply`` swaps a fake parameter in place (``swap_tensors``), which fails for
    every fake tensor here ("has weakref associated with it"). Within, a conversion that changes
    nothing keeps the parameter, one that does puts a new parameter in its place (one per shared
    parameter: tied weights stay tied) -- what the trainers' ``.to(device)`` / PEFT's ``.to(dtype)``
    mean at build time."""
    orig = nn.Module._apply

    def _apply(self, fn, recurse=True, memo=None):
        memo = {} if memo is None else memo
        if recurse:
            for m in self.children():
                _apply(m, fn, memo=memo)
        with torch.no_grad():
            for key, p in self._parameters.items():
                if p is None:
                    continue
                if id(p) not in memo:
                    q = fn(p)
                    memo[id(p)] = (p, p if q is p else nn.Parameter(q, requires_grad=p.requires_grad))
                self._parameters[key] = memo[id(p)][1]
            for key, b in self._buffers.items():
                if b is not None:
                    self._buffers[key] = fn(b)
        return self

    def _deepcopy(self, memo):  # a reference copy (``copy.deepcopy(model)``): a fresh fake of this mode
        if id(self) not in memo:
            with self.fake_mode:
                t = torch.empty_strided(self.shape, self.stride(), dtype=self.dtype, device=self.device)
            memo[id(self)] = nn.Parameter(t, self.requires_grad) if isinstance(self, nn.Parameter) else \
                t.requires_grad_(self.requires_grad)
        return memo[id(self)]

    # transformers counts a fake tensor as tracing and then always builds the 4-D attention mask
    # (B x 1 x T x T; a real run without padding skips it for SDPA's causal path): within, fake
    # masks are read like real ones (their known values; an unknown ``all`` is False: built)
    import transformers.masking_utils as mu

    orig_tracing = mu.is_tracing
    mu.is_tracing = lambda tensor=None: orig_tracing(
        None if isinstance(tensor, FakeTensor) and _ACTIVE else tensor)  # a _Tracker answers the reads
    had = "__deepcopy__" in FakeTensor.__dict__
    orig_copy = FakeTensor.__dict__.get("__deepcopy__")
    nn.Module._apply, FakeTensor.__deepcopy__ = _apply, _deepcopy
    try:
        with FakeTensorMode(allow_non_fake_inputs=False) as mode:
            yield mode
    finally:
        nn.Module._apply = orig
        mu.is_tracing = orig_tracing
        if had:
            FakeTensor.__deepcopy__ = orig_copy
        else:
            del FakeTensor.__deepcopy__


def fakeify(module, mode, device: str = "cpu", memo: dict | None = None):
    """Replace a meta-device module's parameters and buffers by fake tensors of the same shapes,
    dtypes and sharing (tied weights stay one tensor). Building on the meta device first is
    fast and lets PEFT's ``.to`` calls run on ordinary meta tensors."""
    memo = {} if memo is None else memo
    dev = torch.device(device)

    def fake(t):  # a fresh fake tensor of the mode (not the converter's: its weak memo blocks
        with mode:  # ``module.to``'s parameter swap)
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=dev)

    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            if id(p) not in memo:
                memo[id(p)] = nn.Parameter(fake(p), requires_grad=p.requires_grad)
            sub._parameters[name] = memo[id(p)]
        for name, bf in list(sub._buffers.items()):
            if bf is None:
                continue
            if id(bf) not in memo:
                memo[id(bf)] = fake(bf)
            sub._buffers[name] = memo[id(bf)]
    return module


@contextlib.contextmanager
def repeated_decode_steps(tracker: _Tracker, run: int = 2):
    """Within: the decode engine (``generation.engine``) runs the first ``run`` one-token steps of
    a rollout and counts each later one as a copy of the last it ran. The engine's step has fixed
    shapes by design (static KV cache of the full length, attention over all of it under a mask,
    outputs written into preallocated buffers), so every step after the first allocates, frees
    and computes the same: the same peak, FLOPs and bytes. On fake tensors a step is ~1 000 ops
    dispatched in Python per layer-dozen; a 512-token rollout ran them 512 times (most of a
    plan's time). What the skipped steps would write (sampled ids, positions) is unknowable
    here anyway; their buffers keep their shapes, and the loop its step count."""
    from latentfast.generation import engine

    orig, seen = engine._step, weakref.WeakKeyDictionary()

    def step(eng, e, alive):
        st = seen.setdefault(eng, {"n": 0})
        if st["n"] >= run:
            f, b = tracker.ops[tracker.phase]
            rf, rb, flops = st["ops"]
            f.extend(rf)
            b.extend(rb)
            tracker.flops[tracker.phase] += flops
            return st["out"]
        f, b = tracker.ops.setdefault(tracker.phase, (array("d"), array("d")))
        n0, flops0 = len(f), tracker.flops.get(tracker.phase, 0.0)
        out = orig(eng, e, alive)
        f, b = tracker.ops[tracker.phase]
        st.update(n=st["n"] + 1, out=out, ops=(f[n0:], b[n0:], tracker.flops.get(tracker.phase, 0.0) - flops0))
        return out

    engine._step = step
    try:
        yield
    finally:
        engine._step = orig


def roofline_seconds(ops: tuple, peak_flops: float, bandwidth: float) -> float:
    """``RuntimeEstimator``'s roofline (``operator-level-cost-model``) over recorded ops: each op
    takes max(FLOPs / peak, bytes / bandwidth); the sum. Peak and bandwidth are the caller's
    (the device's spec sheet x the assumed efficiencies)."""
    import numpy as np

    f, b = (np.frombuffer(a, dtype=np.float64) for a in ops)
    return float(np.maximum(f / peak_flops, b / bandwidth).sum())


def categories(snap: dict) -> dict[str, int]:
    """MemTracker's snapshot of one device -> {category: bytes} (no zero rows)."""
    return {str(getattr(k, "value", k)): int(v) for k, v in snap.items() if v}


def gib(b: float) -> float:
    return b / (1 << 30)


def nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


__all__ = ["_Tracker", "fake_mode", "fakeify", "categories", "lm_head_workspace", "gib", "nbytes", "CHUNK_KEY",
           "math"]
