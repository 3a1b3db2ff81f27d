"""The fused lm_head loss engine: one chunk sweep that any per-token objective plugs into.

    loss, metrics = objective_loss(GRPOObjective(...), hidden, lm_head.weight, ids, mask,
                                   {"advantages": adv, "old": old_logps})
    loss.backward()

An **objective** (``latentfast.ops.objectives``) is plain torch over per-token statistics
of ``z = softcap(x W^T + b) / temperature`` -- the log-prob of the target (``logp``),
``entropy``, ``lse`` (log-sum-exp) and ``zsum`` (sum of z over the vocabulary) -- plus
per-token / per-sequence inputs (advantages, old/reference log-probs, ...), gathered in a
:class:`Rows`. It returns the loss; ``metrics`` (no grad) returns what users log. It is
written once: the reference (``latentfast.reference.lm_head_engine``) applies it to
statistics taken from full logits and lets autograd differentiate; this engine gets
dLoss/d(statistics) from the same code with ``torch.func.grad`` and turns it into
dLoss/dlogits in place, chunk by chunk. Per chunk of R rows (padding rows dropped before
any GEMM):

    L  = x_c W^T (+ b)                   GEMM, (R, V) buffer reused across chunks
    lse, logp, entropy = stats(L)        Triton (CPU: native C++ or torch), one read of L
    g  = torch.func.grad(objective)      torch, (R,) vectors
    L <- g (onehot - softmax(L/T)) / T   Triton (CPU: native C++ or torch), in place
    grad_x_c = L W ; grad_W += L^T x_c   GEMMs

so the input/weight/bias gradients are finished when the forward returns, with three GEMMs
in total; the backward only scales them by the incoming gradient. Objectives that also
differentiate ``lse``/``entropy`` (z-loss, entropy bonus) or use a softcap take a torch
path for the logit gradient (``torch.func.vjp`` of the statistics), still one chunk at a
time; ``zsum`` (label smoothing) is a rank-one term that never touches L.

Chunking contract: the loss must be a sum over groups of ``objective.seqs_per_group``
consecutive sequences (normalisers that span the batch come in as inputs or from
``Rows.n_tokens`` / ``Rows.n_seqs``). A chunk then holds whole groups; an objective with
``row_local = True`` (a sum of per-token terms) is chunked anywhere.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import math
from typing import Optional

import torch

from latentfast.ops import _native
from latentfast.ops._dispatch import check_same_device, check_shape, check_tensor, use_triton

STATS = ("logp", "entropy", "lse", "zsum")
# Budget for the (R, V) logits chunk when no chunk size is given. On CPU the GEMMs are
# efficient at far fewer rows, and a small chunk keeps the torch path's temporaries small.
_CHUNK_BYTES = {"cuda": 1 << 30, "cpu": 64 << 20}
_DEFAULT_CHUNK_BYTES = 256 << 20


# ----------------------------------------------------------------- what an objective sees
@dataclasses.dataclass
class Rows:
    """Completion tokens of a chunk (or of the whole batch), in engine order.

    Statistics (fp32, (n,)): ``logp``, ``entropy``, ``lse``, ``zsum`` (None when not computed).
    ``seq`` (n,) is each row's sequence in ``[0, n_seq)``, local to the chunk's sequences;
    ``seq_len`` (n_seq,) their completion-token counts over the whole batch; ``tok`` holds
    per-token inputs (n,), ``per_seq`` per-sequence inputs (n_seq,), ``batch`` whole tensors.
    ``n_tokens`` (0-d fp32) and ``n_seqs`` count the whole batch; ``vocab_size`` is V.
    """

    logp: torch.Tensor
    entropy: Optional[torch.Tensor]
    lse: Optional[torch.Tensor]
    zsum: Optional[torch.Tensor]
    seq: torch.Tensor
    n_seq: int
    seq_len: torch.Tensor
    tok: dict
    per_seq: dict
    batch: dict
    n_tokens: torch.Tensor
    n_seqs: int
    vocab_size: int

    def seq_sum(self, v: torch.Tensor) -> torch.Tensor:
        """(n,) -> (n_seq,) sums per sequence (0 for a sequence without rows)."""
        return torch.zeros(self.n_seq, device=v.device, dtype=v.dtype).index_add(0, self.seq, v)

    def seq_mean(self, v: torch.Tensor) -> torch.Tensor:
        """(n,) -> (n_seq,) means per sequence (0 for a sequence without rows)."""
        return self.seq_sum(v) / self.seq_len.clamp(min=1.0)

    def with_stats(self, stats: dict) -> "Rows":
        return dataclasses.replace(self, **stats)


class Objective:
    """Base of the per-token objectives. Subclasses are frozen dataclasses (hashable: the
    engine's custom op refers to them by key) and define ``loss(rows)`` and ``metrics(rows)``.

    Class attributes:
        stats: the statistics ``loss`` differentiates (subset of logp, entropy, lse, zsum).
        inputs: ``(name, kind)`` pairs; kind "token" = (B, T), "seq" = (B,), "batch" = any.
        row_local: the loss is a sum of per-token terms (chunks may cut sequences).
        seqs_per_group: otherwise, chunks hold whole groups of this many sequences.
        metric_names: keys of ``metrics``; ``metric_shapes`` gives each one's shape.
    """

    stats: tuple = ("logp",)
    inputs: tuple = ()
    row_local: bool = True
    seqs_per_group: int = 1
    metric_names: tuple = ()

    def loss(self, r: Rows) -> torch.Tensor:
        raise NotImplementedError

    def metrics(self, r: Rows) -> dict:
        return {}

    def metric_shapes(self, n_seqs: int) -> dict:
        return {k: () for k in self.metric_names}


_CLASSES: dict[str, type] = {}


def register_objective(cls):
    """Class decorator: lets the engine's custom op rebuild instances from their key."""
    _CLASSES[cls.__qualname__] = cls
    return cls


def objective_key(objective: Objective) -> str:
    """``Name(field=value, ...)``: what the custom op receives (plain string building,
    so torch.compile traces it)."""
    cls = type(objective)
    if _CLASSES.get(cls.__qualname__) is not cls:
        raise TypeError(f"{cls.__qualname__} is not registered: decorate it with @register_objective")
    fields = ", ".join(f"{name}={getattr(objective, name)!r}" for name in cls.__dataclass_fields__)
    return f"{cls.__qualname__}({fields})"


@functools.lru_cache(maxsize=None)
def objective_from_key(key: str) -> Objective:
    name, _, rest = key.partition("(")
    cls = _CLASSES[name]
    kwargs = {}
    if rest[:-1]:
        tree = ast.parse(f"f({rest[:-1]})", mode="eval").body
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in tree.keywords}
    return cls(**kwargs)


# ----------------------------------------------------------------- per-chunk backends
def _torch_logit_stats(L, ids, inv_t):
    z = L.float() * inv_t if (inv_t != 1.0 or L.dtype != torch.float32) else L
    lse = torch.logsumexp(z, dim=-1)
    logp_all = z - lse[:, None]
    ent = -torch.bmm(logp_all.exp().unsqueeze(1), logp_all.unsqueeze(2)).view(-1)  # row-wise dot
    return lse, logp_all.gather(1, ids[:, None]).squeeze(1), ent


def _torch_logit_grad_(L, ids, lse, g, inv_t):
    coef = (g * inv_t)[:, None]
    z = L.float() * inv_t if (inv_t != 1.0 or L.dtype != torch.float32) else L
    grad = torch.exp(z - lse[:, None]).mul_(-coef)
    grad.scatter_add_(1, ids[:, None], coef)
    return L.copy_(grad)


def _backends(t: torch.Tensor):
    """Triton kernels on CUDA / under the interpreter; on CPU the native kernels
    (latentfast/kernels/csrc, when built and not switched off by LATENTFAST_NATIVE=0), else the
    same math in torch."""
    if use_triton(t):
        from latentfast.kernels import grpo_loss as K  # Triton: optional on CPU

        return K.logit_stats, K.logit_grad_
    if _native.usable(t, "logit_stats"):
        ops = torch.ops.latentfast_native
        return ops.logit_stats, ops.logit_grad_
    return _torch_logit_stats, _torch_logit_grad_


def _full_stats(L, ids, inv_t: float, softcap: float):
    """All four statistics of ``z = softcap(L) * inv_t`` in torch (differentiable in L)."""
    z = L.float()
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    z = z * inv_t
    lse = torch.logsumexp(z, dim=-1)
    logp_all = z - lse[:, None]
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return {"logp": logp_all.gather(1, ids[:, None]).squeeze(1), "entropy": ent, "lse": lse, "zsum": z.sum(-1)}


# ----------------------------------------------------------------- chunking
def chunk_rows_default(device: torch.device, V: int, elt: int) -> int:
    """Rows per chunk when none is given: a per-device byte budget for the (R, V) chunk,
    rounded down to a power of two (friendly GEMM shapes), at least 16."""
    budget = _CHUNK_BYTES.get(device.type, _DEFAULT_CHUNK_BYTES)
    rows = max(16, budget // max(V * elt, 1))
    return 1 << int(math.log2(rows))


def row_sum_fp32(t: torch.Tensor, budget: int = 1 << 22) -> torch.Tensor:
    """``t.float().sum(0)`` of an (N, H) tensor, upcast ``budget`` bytes of rows at a time: a bf16
    lm_head's ``.float()`` would be a transient N x H x 4 bytes (on CPU ``sum(dtype=float32)``
    makes that copy too), more than the whole logits chunk and invisible to the planner's fake step."""
    if t.dtype == torch.float32:
        return t.sum(0)
    rows = max(16, budget // (4 * t.shape[1]))
    out = torch.zeros(t.shape[1], device=t.device, dtype=torch.float32)
    for s in range(0, t.shape[0], rows):
        out += t[s:s + rows].float().sum(0)
    return out


def _chunk_bounds(n_rows: int, rows: int, seq_ends: Optional[list[int]]) -> list[tuple[int, int]]:
    """[start, end) row ranges of at most ``rows`` rows. With ``seq_ends`` (cumulative
    row counts per group) chunks hold whole groups; a longer group gets its own."""
    if seq_ends is None:
        return [(s, min(s + rows, n_rows)) for s in range(0, n_rows, rows)]
    bounds, start, prev = [], 0, 0
    for end in seq_ends:
        if end - start > rows and prev > start:
            bounds.append((start, prev))
            start = prev
        prev = end
    if prev > start:
        bounds.append((start, prev))
    return bounds


def _group_chunks(seq_counts: list[int], per_group: int, rows: int):
    """Chunks of whole groups: [(row_start, row_end, seq_lo, seq_hi)], covering every
    sequence exactly once (groups without rows join a neighbouring chunk)."""
    B = len(seq_counts)
    ends, total = [], 0
    for g0 in range(0, B, per_group):
        total += sum(seq_counts[g0:g0 + per_group])
        ends.append((total, min(g0 + per_group, B)))
    out, r0, s0, prev_r, prev_s = [], 0, 0, 0, 0
    for r_end, s_end in ends:
        if r_end - r0 > rows and prev_r > r0:
            out.append((r0, prev_r, s0, prev_s))
            r0, s0 = prev_r, prev_s
        prev_r, prev_s = r_end, s_end
    if prev_s > s0:
        out.append((r0, prev_r, s0, prev_s))
    return out


def _linear_chunk(x_c, weight, bias, out):
    if bias is None:
        return torch.mm(x_c, weight.t(), out=out)
    return torch.addmm(bias, x_c, weight.t(), out=out)


# ----------------------------------------------------------------- gathering rows
def select_rows(mask: torch.Tensor, seq_order: Optional[torch.Tensor]):
    """Flat (B*T) indices of the completion tokens, sequence by sequence in ``seq_order``
    (default 0..B-1), and each row's position in that order. Shared by the reference."""
    B, T = mask.shape
    m = mask.ne(0)
    if seq_order is None:
        rows_idx = m.reshape(-1).nonzero().squeeze(1)
        return rows_idx, rows_idx // T
    flat = (seq_order[:, None] * T + torch.arange(T, device=mask.device)[None]).reshape(-1)
    keep = m.index_select(0, seq_order).reshape(-1)
    pos = keep.nonzero().squeeze(1)
    return flat.index_select(0, pos), pos // T


def gather_inputs(objective: Objective, inputs: list, rows_idx, seq_order):
    """The objective's inputs in engine order: token ones gathered to rows, per-sequence
    ones permuted by ``seq_order``, batch ones as given."""
    tok, per_seq, batch = {}, {}, {}
    for (name, kind), t in zip(objective.inputs, inputs):
        if t is None:
            continue
        if kind == "token":
            tok[name] = t.reshape(-1).index_select(0, rows_idx)
        elif kind == "seq":
            per_seq[name] = t if seq_order is None else t.index_select(0, seq_order)
        else:
            batch[name] = t
    return tok, per_seq, batch


def _seq_slice(r_all_tok, r_all_seqv, seq_len, seq, s, e, lo, hi, row_local):
    tok = {k: v[s:e] for k, v in r_all_tok.items()}
    if row_local:
        return tok, r_all_seqv, seq_len, seq[s:e], len(seq_len)
    return tok, {k: v[lo:hi] for k, v in r_all_seqv.items()}, seq_len[lo:hi], seq[s:e] - lo, hi - lo


# ----------------------------------------------------------------- the engine op
_K = torch._C.DispatchKey
# Keys torch.func needs. A TorchDispatchMode around the op (torch.compile's first-call
# aliasing check, FlopCounterMode, ...) leaves them excluded while the op body runs.
_FUNC_KEYS = functools.reduce(
    lambda a, k: a | torch._C.DispatchKeySet(k),
    (_K.FuncTorchDynamicLayerBackMode, _K.FuncTorchGradWrapper, _K.FuncTorchBatched, _K.FuncTorchVmapMode,
     _K.PythonTLSSnapshot, _K.ADInplaceOrView), torch._C.DispatchKeySet(_K.FuncTorchDynamicLayerFrontMode))


@contextlib.contextmanager
def _func_enabled():
    """Context in which torch.func transforms work inside the op body: the functorch keys
    back in the TLS, and saved-tensor hooks (activation checkpointing around the loss)
    lifted -- torch.func refuses them, and nothing the body computes is saved for an
    outer backward (the op's gradients are finished tensors)."""
    ag = torch._C._autograd
    hooks = []
    while (top := ag._top_saved_tensors_default_hooks(True)) is not None:
        hooks.append(top)
        ag._pop_saved_tensors_default_hooks()
    try:
        with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(),
                                             torch._C._dispatch_tls_local_exclude_set() - _FUNC_KEYS):
            yield
    finally:
        for pack, unpack in reversed(hooks):
            ag._push_saved_tensors_default_hooks(pack, unpack)


def _stat_grads(objective, rows_c, stats_c):
    """dLoss/d(statistics) of one chunk from the objective itself (torch.func.grad)."""
    names = [k for k in STATS if k in objective.stats]

    def f(*vals):
        return objective.loss(rows_c.with_stats(dict(zip(names, vals))))

    with _func_enabled():
        grads, value = torch.func.grad_and_value(f, argnums=tuple(range(len(names))))(*[stats_c[k] for k in names])
    return dict(zip(names, grads)), value


@torch.library.custom_op("latentfast::lm_head_objective", mutates_args=())
def _engine_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], ids: torch.Tensor, mask: torch.Tensor,
    seq_order: Optional[torch.Tensor], inputs: list[Optional[torch.Tensor]], objective: str,
    temperature: float, softcap: float, chunk_rows: int, need_grad_x: bool, need_grad_weight: bool,
    need_grad_bias: bool,
) -> list[torch.Tensor]:
    """Returns [loss, logp (B, T), entropy (B, T), grad_x, grad_weight, grad_bias, *metrics].

    x (B, T, H); ids/mask (B, T). Per-token outputs are fp32, 0 on padding. Gradients
    not asked for are empty tensors. Metrics follow ``objective.metric_names``.
    """
    obj = objective_from_key(objective)
    stats_k, grad_k = _backends(x)
    B, T, H = x.shape
    V = weight.shape[0]
    inv_t = 1.0 / temperature
    dev = x.device

    rows_idx, seq = select_rows(mask, seq_order)
    n = rows_idx.numel()
    x2 = x.reshape(B * T, H).index_select(0, rows_idx)
    ids1 = ids.reshape(-1).index_select(0, rows_idx)
    tok, per_seq, batch = gather_inputs(obj, inputs, rows_idx, seq_order)
    seq_len = torch.zeros(B, device=dev).index_add_(0, seq, torch.ones(n, device=dev))
    n_tokens = torch.tensor(float(n), device=dev)

    # The kernels compute logp, entropy and lse; their gradient is g (onehot - p). A
    # gradient through lse (g_lse p) is (g - g_lse)(onehot - p) + g_lse onehot: the kernel
    # plus one value per row. Entropy's gradient or a softcap take the torch path.
    rows = chunk_rows if chunk_rows > 0 else chunk_rows_default(dev, V, x.element_size())
    fast = softcap <= 0 and "entropy" not in obj.stats
    if not fast and chunk_rows <= 0:  # the torch vjp path keeps ~8 fp32 (R, V) temporaries
        rows = max(16, rows // 8)
    if obj.row_local:
        bounds = [(s, e, 0, B) for s, e in _chunk_bounds(n, rows, None)]
    else:
        bounds = _group_chunks(seq_len.long().tolist(), obj.seqs_per_group, rows)
    need_zsum = "zsum" in obj.stats
    if fast:  # sum_v z_v = (x_c . sum_v W_v + sum b) / T: a GEMV, L untouched
        w_sum = row_sum_fp32(weight)
        b_sum = bias.float().sum() if bias is not None else 0.0

    loss = torch.zeros((), device=dev, dtype=torch.float32)
    all_stats = {k: torch.zeros(n, device=dev, dtype=torch.float32) for k in STATS}
    grad_x = torch.empty_like(x2) if need_grad_x else None
    grad_w = torch.zeros_like(weight, dtype=torch.float32 if need_zsum else weight.dtype) \
        if need_grad_weight else None
    grad_b = torch.zeros(V, device=dev, dtype=torch.float32) if need_grad_bias else None
    L = torch.empty(max((e - s for s, e, _, _ in bounds), default=0), V, device=dev, dtype=x.dtype)

    for i, (s, e, lo, hi) in enumerate(bounds):
        x_c, ids_c = x2[s:e], ids1[s:e].contiguous()
        Lc = _linear_chunk(x_c, weight, bias, L[: e - s])
        if fast:
            lse, lp, ent = stats_k(Lc, ids_c, inv_t)
            st = {"logp": lp, "entropy": ent, "lse": lse, "zsum": (x_c.float() @ w_sum + b_sum) * inv_t}
        else:
            with _func_enabled():
                st, vjp = torch.func.vjp(lambda l: _full_stats(l, ids_c, inv_t, softcap), Lc.float())
        for k, v in st.items():
            all_stats[k][s:e] = v.detach()
        tok_c, seqv_c, len_c, seq_c, n_seq_c = _seq_slice(tok, per_seq, seq_len, seq, s, e, lo, hi, obj.row_local)
        rows_c = Rows(st["logp"], st.get("entropy"), st.get("lse"), st.get("zsum"), seq_c, n_seq_c, len_c,
                      tok_c, seqv_c, batch, n_tokens, B, V)
        g, value = _stat_grads(obj, rows_c, st)
        loss += value.float()
        if not (need_grad_x or need_grad_weight or need_grad_bias):
            continue
        if fast:
            g_lp = g["logp"].float() if "logp" in g else torch.zeros_like(st["logp"])
            g_lse = g["lse"].float() if "lse" in g else None
            grad_k(Lc, ids_c, st["lse"], (g_lp if g_lse is None else g_lp - g_lse).contiguous(), inv_t)
            if g_lse is not None:  # Lc <- dLoss/dlogits
                Lc[torch.arange(e - s, device=dev), ids_c] += (g_lse * inv_t).to(Lc.dtype)
            g_zs = g["zsum"].float() * inv_t if need_zsum else None
        else:
            cot = {k: (g[k] if k in g else torch.zeros_like(v)) for k, v in st.items()}
            with _func_enabled():
                Lc.copy_(vjp(cot)[0])
            g_zs = None
        if need_grad_x:
            torch.mm(Lc, weight, out=grad_x[s:e])
        if need_grad_weight:
            if grad_w.dtype == Lc.dtype:
                grad_w.addmm_(Lc.t(), x_c)
            else:
                grad_w.add_(Lc.t() @ x_c)
        if need_grad_bias:
            grad_b += Lc.sum(0, dtype=torch.float32)
        if g_zs is not None:  # rank one: d zsum / d L = 1 everywhere
            if need_grad_x:
                grad_x[s:e] += (g_zs[:, None] * w_sum[None]).to(grad_x.dtype)
            if need_grad_weight:
                grad_w += (g_zs @ x_c.float())[None]
            if need_grad_bias:
                grad_b += g_zs.sum()

    def dense(v):  # (n,) over completion tokens -> (B, T), 0 on padding
        return torch.zeros(B * T, device=dev).index_copy_(0, rows_idx, v).view(B, T)

    out_x = (torch.zeros(B * T, H, device=dev, dtype=x.dtype).index_copy_(0, rows_idx, grad_x).view(B, T, H)
             if need_grad_x else x.new_empty(0))
    out_w = grad_w.to(weight.dtype) if need_grad_weight else weight.new_empty(0)
    out_b = grad_b.to(bias.dtype) if need_grad_bias else weight.new_empty(0)

    with torch.no_grad():  # metrics on the whole batch, from the same objective
        full = Rows(all_stats["logp"], all_stats["entropy"], all_stats["lse"], all_stats["zsum"], seq, B, seq_len,
                    tok, per_seq, batch, n_tokens, B, V)
        met = obj.metrics(full)
        shapes = obj.metric_shapes(B)
        metrics = [torch.as_tensor(met[k], device=dev, dtype=torch.float32).reshape(shapes[k]).clone()
                   for k in obj.metric_names]
    return [loss, dense(all_stats["logp"]), dense(all_stats["entropy"]), out_x, out_w, out_b, *metrics]


@_engine_fwd.register_fake
def _(x, weight, bias, ids, mask, seq_order, inputs, objective, temperature, softcap, chunk_rows, need_grad_x,
      need_grad_weight, need_grad_bias):
    obj = objective_from_key(objective)
    f32 = lambda shape: x.new_empty(shape, dtype=torch.float32)  # noqa: E731
    shapes = obj.metric_shapes(x.shape[0])
    return [f32(()), f32(ids.shape), f32(ids.shape),
            torch.empty_like(x) if need_grad_x else x.new_empty(0),
            torch.empty_like(weight) if need_grad_weight else weight.new_empty(0),
            torch.empty_like(bias) if need_grad_bias else weight.new_empty(0),
            *[f32(shapes[k]) for k in obj.metric_names]]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[3], output[4], output[5])
    ctx.flags = inputs[11:14]
    # autograd's pytree sees a list of tensors as a list, one holding a None as a leaf
    ins = inputs[6]
    ctx.inputs_grad = [None] * len(ins) if all(isinstance(t, torch.Tensor) for t in ins) else None


def _backward(ctx, grads):
    grad_loss = grads[0]  # only the loss is differentiable; the wrapper detaches the rest
    gx, gw, gb = ctx.saved_tensors
    nx, nw, nb = ctx.flags
    return (gx * grad_loss if nx else None, gw * grad_loss if nw else None, gb * grad_loss if nb else None,
            None, None, None, ctx.inputs_grad, *([None] * 7))


_engine_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------- no-grad statistics sweep
@torch.library.custom_op("latentfast::lm_head_logp_entropy", mutates_args=())
def _logp_entropy(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], ids: torch.Tensor,
    mask: Optional[torch.Tensor], temperature: float, chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """No-grad sweep: per-token logp of ``ids`` and entropy, fp32, 0 where mask == 0."""
    stats, _ = _backends(x)
    H, V = x.shape[-1], weight.shape[0]
    x2, ids1 = x.reshape(-1, H), ids.reshape(-1)
    rows_idx = mask.reshape(-1).nonzero().squeeze(1) if mask is not None else None
    if rows_idx is not None:
        x2, ids1 = x2.index_select(0, rows_idx), ids1.index_select(0, rows_idx)
    n = x2.shape[0]
    logp, ent = (torch.empty(n, device=x.device, dtype=torch.float32) for _ in range(2))
    rows = chunk_rows if chunk_rows > 0 else chunk_rows_default(x.device, V, x.element_size())
    L = torch.empty(min(rows, n), V, device=x.device, dtype=x.dtype)
    for s in range(0, n, rows):
        e = min(s + rows, n)
        Lc = _linear_chunk(x2[s:e], weight, bias, L[: e - s])
        _, logp[s:e], ent[s:e] = stats(Lc, ids1[s:e].contiguous(), 1.0 / temperature)
    if rows_idx is None:
        return logp.view(ids.shape), ent.view(ids.shape)
    dense = lambda v: torch.zeros(ids.numel(), device=x.device).index_copy_(0, rows_idx, v).view(ids.shape)  # noqa: E731
    return dense(logp), dense(ent)


@_logp_entropy.register_fake
def _(x, weight, bias, ids, mask, temperature, chunk_rows):
    return ids.new_empty(ids.shape, dtype=torch.float32), ids.new_empty(ids.shape, dtype=torch.float32)


# ----------------------------------------------------------------- public API
def autocast_head(x, weight, bias):
    """Under autocast, compute in the autocast dtype, as ``F.linear`` (the lm_head) would."""
    if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    return x, weight, bias


def check_head(x, weight, bias, ids, ids_name: str = "selected_token_ids", check_range: bool = True):
    """x (..., H), weight (V, H), bias (V,), ids shaped like x.shape[:-1] with values in [0, V)."""
    check_tensor("_input", x, float_=True)
    H = x.shape[-1]
    check_tensor("lin_weight", weight, ndim=2, float_=True)
    check_shape("lin_weight", weight, (None, H), "(vocab_size, hidden_size)")
    if weight.dtype != x.dtype:
        raise TypeError(f"_input and lin_weight must share one dtype, got {x.dtype} and {weight.dtype}")
    V = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, float_=True, dtype=x.dtype)
        check_shape("bias", bias, (V,), "(vocab_size,)")
    check_tensor(ids_name, ids)
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{ids_name} must be int64/int32 token ids, got {ids.dtype}")
    check_shape(ids_name, ids, tuple(x.shape[:-1]), "leading dims of _input")
    check_same_device(_input=x, lin_weight=weight, bias=bias, **{ids_name: ids})
    if check_range and not torch.compiler.is_compiling() and ids.numel() and (
            int(ids.min()) < 0 or int(ids.max()) >= V):
        raise ValueError(f"{ids_name} must lie in [0, {V}), got range [{int(ids.min())}, {int(ids.max())}]")


def objective_loss(objective: Objective, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   ids: torch.Tensor, mask: torch.Tensor, inputs: dict, *, temperature: float = 1.0,
                   softcap: Optional[float] = None, seq_order: Optional[torch.Tensor] = None,
                   chunk_rows: int = 0, return_logps: bool = False):
    """``(loss, metrics)`` of ``objective`` on ``x`` (B, T, H) through the lm_head, fused
    (``return_logps``: also the detached (B, T) fp32 token log-probs, 0 on padding, which
    the sweep computes anyway: what SPO's value tracker and PPO's old log-probs need).

    ``ids``/``mask`` (B, T); ``inputs`` maps the objective's input names to tensors (absent
    or None = not given); ``seq_order`` (B,) is the order sequences are swept in (groups
    are consecutive in it). ``chunk_rows`` 0 = the per-device default. Arguments are
    assumed checked by the caller. ``metrics`` is a dict of detached tensors."""
    key = objective_key(objective)
    need = (x.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() is False:
        need = (False, False, False)
    ins = [None if inputs.get(name) is None else inputs[name].detach() for name, _ in objective.inputs]
    out = _engine_fwd(x, weight, bias, ids.long(), mask.ne(0), seq_order, ins, key, float(temperature),
                      float(softcap or 0.0), int(chunk_rows), *need)
    metrics = dict(zip(objective.metric_names, (m.detach() for m in out[6:])))
    return (out[0], metrics, out[1].detach()) if return_logps else (out[0], metrics)


def lm_head_logps(x: torch.Tensor, weight: torch.Tensor, selected_token_ids: torch.Tensor,
                  bias: torch.Tensor | None = None, temperature: float = 1.0,
                  mask: torch.Tensor | None = None, chunk_size: int | None = None):
    """No-grad per-token ``log_softmax((x W^T + b) / T)[ids]`` and entropy without the logits.

    For old/reference log-probs: ``ref, _ = lm_head_logps(ref_hidden, W, ids, mask=mask)``.
    Shapes: x (..., H), ids (...); returns two fp32 tensors shaped like ids (0 where mask == 0).
    ``chunk_size``: sequences per chunk (Liger's meaning); None = the per-device default.
    """
    x, weight, bias = autocast_head(x, weight, bias)
    check_head(x, weight, bias, selected_token_ids)
    if mask is not None:
        check_shape("mask", mask, tuple(selected_token_ids.shape), "same as selected_token_ids")
    rows = (chunk_size or 0) * (x.shape[1] if x.dim() == 3 else 1)
    with torch.no_grad():
        return _logp_entropy(x.detach(), weight.detach(), None if bias is None else bias.detach(),
                             selected_token_ids.long(), None if mask is None else mask.ne(0),
                             float(temperature), int(rows))
