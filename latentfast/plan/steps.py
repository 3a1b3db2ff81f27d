"""The workload (the planner's input) and the one step that is NOT a trainer's own code: a sketch
of the peers' way (recipe), for comparison.

A :class:`Workload` names the model, the trainer, the shapes and switches (``config``: the
trainer's own config when the user typed it, ``--plan``). With ``impl="latentfast"`` the planner
runs the trainer's own step (``plan.trainers``, ``harness``: sft, kv, codi, hrpo, grpo, rloo, dpo
on train/rl, every MiniMind stage). This file's ``StepRunner`` runs ``impl="recipe"``, the peers'
way for comparison -- full logits from the HF forward, HF's ``ForCausalLMLoss`` for
cross-entropy, TRL's ``selective_log_softmax`` for GRPO/DPO log-probs (the recipe's HRPO also runs
its extra no-grad forward: two-pass), full teacher logits for distillation and KV. A sketch of
their step, not their code; there is no peers' PPO step (PPO is MiniMind's only, planned as its own).

What these steps hold, by family (B = sequences per micro-batch):
  sft       fwd + bwd of B x T with HF's cross-entropy on full logits
  grpo      rollout (no grad: static KV cache B x (P + C), prefill), reference log-probs (no grad,
            beta > 0), then per micro-batch fwd + bwd of the GRPO loss on B x (P + C); every
            micro-batch's rollout is kept until training (the loop's ``batches``). ``hrpo`` adds the
            thinking modules (3 D x D) and the two-pass forward's no-grad states; a reward model
            (``reward_model``: MiniMind's train_grpo.py, the recipe) scores B x (P + C) tokens
  dpo       2B sequences (chosen + rejected), a frozen reference copy (LoRA: adapters off)
  distill   a frozen teacher's no-grad forward, then the student's CE + KL on full logits
  kv        frozen teacher(s): K/V of the paired layers kept; the student's CE + K/V MSE through
            per-layer projections (multi-teacher: every teacher's K/V at once)
  codi      the CoT teacher pass (CE, with grad) and the latent student pass (question + latents +
            answer) on the same LoRA model, plus the latent projection
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from latentfast.choices import PLAN_IMPLS

FAMILIES = ("sft", "grpo", "hrpo", "ppo", "dpo", "distill", "kv", "codi")
IMPLS = PLAN_IMPLS  # (latentfast.choices: latentfast-plan --help lists them torch-free)
REWARD_MODEL = dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                    num_attention_heads=16, num_key_value_heads=8, vocab_size=92544, rms_norm_eps=1e-5,
                    max_position_embeddings=32768, tie_word_embeddings=False)  # internlm2-1_8b-reward's shapes


@dataclass
class Workload:
    """One trainer step's shapes and switches (the planner's input)."""

    model: str = "Qwen2.5-1.5B-Instruct"
    family: str = "hrpo"
    impl: str = "latentfast"
    micro_batch: int = 8  # sequences per micro-batch (completions for RL, pairs x 2 for DPO)
    grad_accum: int = 1
    prompt_len: int = 512  # RL: prompt tokens; others: 0 (seq_len is completion_len)
    completion_len: int = 512  # RL: new tokens; others: sequence length
    lora_rank: int = 0
    grad_ckpt: bool = False
    bf16: bool = True  # bf16 autocast; LoRA bases in bf16, full fine-tuning keeps fp32 master weights
    beta: float = 0.0  # > 0: reference log-probs (RL)
    teachers: list[str] = field(default_factory=list)  # distill / kv: teacher models
    reward_model: bool | str | dict = False  # a frozen reward model scores the rollouts (MiniMind RL): True =
    # internlm2-1.8b-reward's shapes (MiniMind's default), or its config (a named config, config.json, dict)
    chunk_rows: int = 0  # rows per fused lm_head chunk (0 = the op's per-device default)
    num_latent: int = 6  # codi
    keep_rollout_cache: bool | None = None  # None: latentfast on CUDA keeps the compiled engine's cache
    max_micro_measured: int = 2  # micro-batches actually run (the rest repeat the same peak)
    trainer: str = ""  # the trainer whose own step runs (``plan.trainers``); "" = the family's
    config: object = None  # that trainer's config as the user typed it (``--plan``); None: from these fields

    def __post_init__(self):
        self.trainer = self.trainer or self.family
        if self.family not in FAMILIES:
            raise ValueError(f"--trainer: expected one of {FAMILIES}, got {self.family!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl: expected one of {IMPLS}, got {self.impl!r}")
        for name in ("micro_batch", "grad_accum", "completion_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}: expected an integer >= 1, got {getattr(self, name)!r}")
        if self.prompt_len < 0 or self.lora_rank < 0:
            raise ValueError("--prompt_len and --lora_rank must be >= 0")
        if self.family in ("distill", "kv") and not self.teachers:
            raise ValueError(f"--teachers: the {self.family} family needs at least one teacher model")

    def replace(self, **kw) -> "Workload":
        return dataclasses.replace(self, **kw)

    @property
    def rl(self) -> bool:
        return self.family in ("grpo", "hrpo", "ppo")


# ----------------------------------------------------------------------------- models
def _parts(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model, base.lm_head


def build_lm(name, dtype, trainable=True):
    from transformers import AutoModelForCausalLM

    from .models import hf_config

    cfg = hf_config(name)
    m = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if hasattr(m.config, "use_cache"):
        m.config.use_cache = False
    m.requires_grad_(trainable)
    return m


def add_lora(model, rank: int):
    from peft import LoraConfig

    from latentfast.hf.adapter import wrap_peft  # get_peft_model without PEFT's transformers FutureWarning

    names = {n.rsplit(".", 1)[-1] for n, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    targets = sorted(names & {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
    return wrap_peft(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0))


class ThinkingModules(nn.Module):
    """HRPO's additions at their sizes: the projection and the two residual gates (D x D each)."""

    def __init__(self, d):
        super().__init__()
        self.projection = nn.Linear(d, d, bias=False)
        self.gate_r = nn.Linear(d, d, bias=False)
        self.gate_i = nn.Linear(d, d, bias=False)

    def forward(self, embeds, states):
        s = nn.functional.normalize(self.projection(states), dim=-1)
        a = torch.sigmoid(self.gate_r(embeds))
        return a * embeds + (1 - a) * torch.tanh(self.gate_i(s)) * s


@dataclass
class Built:
    model: nn.Module
    extra: nn.Module | None  # trainable modules beside the model (HRPO, KV projections, CODI prj)
    frozen: list  # teachers / reference / reward models
    optimizers: list
    cfg: object
    rollout: tuple | None = None  # a trainer's own step: (generation batch rows, prompt + completion tokens)


def build(w: Workload, fake_mode=None) -> Built:
    """The step's models and optimizers: real CPU tensors, or with ``fake_mode`` built on the meta
    device and turned into fake tensors of that mode before the optimizers see them."""
    if w.impl != "recipe":  # latentfast: the trainers' own steps (``plan.trainers``, ``harness``)
        raise ValueError(f"trainer {w.trainer!r}: no trainer of latentfast.plan.trainers runs this workload")
    if w.family == "ppo":  # the one PPO trainer here (MiniMind's) runs its own step (``plan.trainers``)
        raise ValueError("--impl recipe: no PPO step of the peers' is planned; MiniMind's PPO runs its own "
                         "(--impl latentfast, a MiniMind model)")
    if fake_mode is None:
        return _build(w, lambda m: m)
    from .fake import fakeify

    memo: dict = {}
    with torch.device("meta"):
        return _build(w, lambda m: fakeify(m, fake_mode, "cpu", memo), fake_mode)


def _build(w: Workload, finish, mode=None) -> Built:
    full_dtype = torch.float32 if w.lora_rank == 0 or not w.bf16 else torch.bfloat16
    model = build_lm(w.model, full_dtype)
    cfg = model.config
    if w.lora_rank > 0:
        model = add_lora(model, w.lora_rank)
    if w.grad_ckpt:  # transformers' current name (gradient_checkpointing_enable is deprecated)
        from latentfast.hf.adapter import enable_activation_checkpointing

        if hasattr(_parts(model)[0], "gradient_checkpointing_enable"):
            enable_activation_checkpointing(_parts(model)[0], use_reentrant=False)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        enable_activation_checkpointing(base, use_reentrant=False)
    frozen_dtype = torch.bfloat16 if w.bf16 else torch.float32
    frozen, extra = [], None
    d = cfg.hidden_size
    if w.family == "hrpo":
        extra = ThinkingModules(d)
    if w.family in ("distill", "kv"):
        frozen += [build_lm(t, frozen_dtype, trainable=False) for t in w.teachers]
    if w.family == "kv":
        from .models import hf_config

        extra = nn.ModuleList()
        for t in w.teachers:
            tc = hf_config(t)
            extra.append(nn.ModuleList(nn.Linear(_kv_width(cfg), _kv_width(tc), bias=False)
                                       for _ in range(min(cfg.num_hidden_layers, tc.num_hidden_layers))))
    if w.family == "codi":
        extra = nn.Sequential(nn.Linear(d, 2048), nn.GELU(), nn.Linear(2048, d), nn.LayerNorm(d))
    needs_ref = (w.family == "dpo" or (w.rl and w.beta > 0)) and w.lora_rank == 0
    if needs_ref:  # a frozen copy (LoRA: the same model with adapters off)
        frozen.append(build_lm(w.model, frozen_dtype, trainable=False))
    if w.reward_model:
        rm = dict(REWARD_MODEL) if w.reward_model is True else w.reward_model
        frozen.append(build_lm(rm, frozen_dtype, trainable=False))
    model = finish(model)
    extra = None if extra is None else finish(extra)
    frozen = [finish(m) for m in frozen]
    trainable = [p for p in model.parameters() if p.requires_grad]
    if extra is not None:
        trainable += list(extra.parameters())
    with (mode if mode is not None else contextlib.nullcontext()), torch.device("cpu"):
        opts = [torch.optim.AdamW(trainable, lr=1e-5, betas=(0.9, 0.99))]
    return Built(model, extra, frozen, opts, cfg)


def init_optimizer_state(b: Built):
    """AdamW's states exist from the second step on: one zero-gradient step creates them."""
    for opt in b.optimizers:
        for g in opt.param_groups:
            for p in g["params"]:
                p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)


def _kv_width(cfg):
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


# ----------------------------------------------------------------------------- token losses
def _amp(w: Workload):
    return torch.autocast("cpu", dtype=torch.bfloat16) if w.bf16 else contextlib.nullcontext()


def _ids(V, *shape):
    return torch.randint(0, V, shape)


def _trl_logps(logits, ids):
    """TRL's ``selective_log_softmax`` when TRL is installed (it is not a dependency), else
    ``selective_logps``: the same values and memory pattern."""
    try:
        from trl.trainer.utils import selective_log_softmax
    except ImportError:
        return selective_logps(logits, ids)
    return selective_log_softmax(logits, ids)


def selective_logps(logits, ids):
    """log_softmax(logits).gather(ids) the way TRL 1.16's unfused path spends memory: fp32
    gathers the chosen logits and takes each row's logsumexp in a loop; bf16/fp16 take a
    row-by-row log_softmax."""
    if logits.dtype in (torch.float32, torch.float64):
        chosen = torch.gather(logits, -1, ids.unsqueeze(-1)).squeeze(-1)
        return chosen - torch.stack([torch.logsumexp(row, -1) for row in logits])
    return torch.stack([torch.log_softmax(row, -1).gather(-1, i.unsqueeze(-1)).squeeze(-1)
                        for row, i in zip(logits, ids)])


def _no_grad_logps(w, model, ids, P):
    """Reference / old log-probs of the completion tokens (no grad)."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        logits = logits[:, P - 1:-1] if P else logits
        return _trl_logps(logits, ids[:, -logits.shape[1]:])


# ----------------------------------------------------------------------------- the step
class StepRunner:
    """Runs ``w``'s step on ``b`` (real or fake tensors alike); ``phase(name)`` marks phases."""

    def __init__(self, w: Workload, b: Built, phase=None, device_type: str = "cuda"):
        self.w, self.b = w, b
        self.phase = phase or (lambda name: contextlib.nullcontext())
        self.V = b.cfg.vocab_size
        self.keep_cache = bool(w.keep_rollout_cache)  # the peers' decode frees its cache

    def run(self):
        w = self.w
        held = self.rollouts() if w.rl else [None] * w.grad_accum
        n = min(w.grad_accum, w.max_micro_measured)
        with self.phase("train"):
            for m in range(n):
                loss = self.loss(held[m] if held else None)
                (loss / w.grad_accum).backward()
                del loss
        with self.phase("optimizer"):
            for opt in self.b.optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
        return held

    # --- RL: rollouts, rewards, reference log-probs of every micro-batch (no grad)
    def rollouts(self):
        w, b = self.w, self.b
        dec, head = _parts(b.model)
        P, C, B = w.prompt_len, w.completion_len, w.micro_batch
        held, cache = [], None
        with self.phase("rollout"), torch.no_grad():
            from .models import kv_bytes_per_token

            # the engine's static cache: K and V of every layer, bf16, one per rollout shape
            cache = torch.empty(B, P + C, kv_bytes_per_token(b.cfg, 2) // 2, dtype=torch.bfloat16)
            for m in range(w.grad_accum):
                if m:  # every micro-batch's rollout outputs are kept; their computation repeats the first's
                    held.append({k: v.clone() for k, v in held[0].items()})
                    continue
                with _amp(w):
                    prompt = _ids(self.V, B, max(P, 1))
                    h = dec(input_ids=prompt).last_hidden_state[:, -1]
                    head(h).float().softmax(-1)  # the first sampling step
                    del h
                    ids = torch.cat([prompt, _ids(self.V, B, C)], 1)
                    item = {"ids": ids, "mask": torch.ones(B, C, dtype=torch.long), "adv": torch.randn(B)}
                    if w.reward_model:
                        rm = b.frozen[-1]
                        rm.model(input_ids=_ids(rm.config.vocab_size, B, P + C)).last_hidden_state[:, -1].sum()
                    if w.beta > 0:
                        ctx = b.model.disable_adapter() if w.lora_rank else contextlib.nullcontext()
                        ref_model = b.model if w.lora_rank else b.frozen[0]
                        with ctx:
                            item["ref"] = _no_grad_logps(w, ref_model, ids, P)
                held.append(item)
            if self.keep_cache:
                self.cache = cache
            del cache
        return held

    def loss(self, item):
        return getattr(self, "_" + ("grpo" if self.w.family == "hrpo" else self.w.family))(item)

    def _sft(self, _):  # the recipe's (HF's loss on full logits); latentfast's is the trainers' own step
        w, b = self.w, self.b
        B, T = w.micro_batch, w.completion_len
        ids = _ids(self.V, B, T)
        with _amp(w):
            out = b.model(input_ids=ids, labels=ids)
            aux = getattr(out, "aux_loss", None)
            return out.loss + aux if aux is not None else out.loss

    def _grpo(self, item):
        w, b = self.w, self.b
        P, C = w.prompt_len, w.completion_len
        dec, head = _parts(b.model)
        ids, mask, adv = item["ids"], item["mask"], item["adv"]
        comp = ids[:, P:]
        with _amp(w):
            kw = {}
            if w.family == "hrpo":
                embed = dec.get_input_embeddings()
                e = embed(ids)
                with torch.no_grad():  # the recipe's extra no-grad forward recomputes the hidden states
                    states = dec(inputs_embeds=e.detach()).last_hidden_state[:, P:]
                mixed = b.extra(e[:, P:], states.to(e.dtype))
                kw["inputs_embeds"] = torch.cat([e[:, :P], mixed.to(e.dtype)], 1)
            else:
                kw["input_ids"] = ids
            out = b.model(**kw)
            logits = out.logits[:, P - 1:-1] if P else out.logits
            logps = _trl_logps(logits, comp)
            ratio = torch.exp(logps - logps.detach())
            per_tok = -ratio * adv[:, None]
            if item.get("ref") is not None:
                d = item["ref"] - logps
                per_tok = per_tok + w.beta * (torch.exp(d) - d - 1)
            loss = ((per_tok * mask).sum(1) / mask.sum(1)).mean()
        return loss

    def _dpo(self, _):
        w, b = self.w, self.b
        B2, T = 2 * max(1, w.micro_batch // 2), w.completion_len
        ids = _ids(self.V, B2, T)
        ref_model = b.model if w.lora_rank else b.frozen[0]
        ctx = b.model.disable_adapter() if w.lora_rank else contextlib.nullcontext()
        with _amp(w):
            with torch.no_grad(), ctx:
                ref = _trl_logps(ref_model(input_ids=ids).logits[:, :-1], ids[:, 1:]).sum(1)
            lp = _trl_logps(b.model(input_ids=ids).logits[:, :-1], ids[:, 1:]).sum(1)
            d = (lp - ref).view(2, -1)
            return -nn.functional.logsigmoid(0.1 * (d[0] - d[1])).mean()

    def _distill(self, _):  # the recipe's (full teacher and student logits); latentfast's: MiniMind's own step
        w, b = self.w, self.b
        B, T = w.micro_batch, w.completion_len
        ids = _ids(self.V, B, T)
        teacher = b.frozen[0]
        with _amp(w):
            with torch.no_grad():
                t_logits = teacher(input_ids=ids).logits[..., :self.V].float()
            out = b.model(input_ids=ids, labels=ids)
            s = out.logits.float()
            kd = nn.functional.kl_div(torch.log_softmax(s / 1.5, -1).flatten(0, 1),
                                      torch.softmax(t_logits / 1.5, -1).flatten(0, 1), reduction="batchmean")
            return 0.5 * out.loss + 0.5 * 2.25 * kd

    def _kv(self, _):
        w, b = self.w, self.b
        B, T = w.micro_batch, w.completion_len
        ids = _ids(self.V, B, T)
        t_kv = []
        with torch.no_grad(), _amp(w):
            for teacher, projs in zip(b.frozen, b.extra):
                out = teacher.model(input_ids=ids, use_cache=True)
                cache = out.cache
                t_kv.append([(cache.layers[i].keys.detach().clone(), cache.layers[i].values.detach().clone())
                             for i in range(len(projs))])
                del out, cache
        dec, head = _parts(b.model)
        with _amp(w):  # the recipe's (full logits); latentfast's is latentfast-kv-distill's own step
            out = dec(input_ids=ids, use_cache=True)
            logits = head(out.last_hidden_state).float()
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            s_cache = out.cache
            for kvs, projs in zip(t_kv, b.extra):
                for i, ((tk, tv), proj) in enumerate(zip(kvs, projs)):
                    sk, sv = s_cache.layers[i].keys, s_cache.layers[i].values
                    for s_t, t_t in ((sk, tk), (sv, tv)):
                        s2 = proj(s_t.transpose(1, 2).flatten(2))
                        loss = loss + ((s2.float() - t_t.transpose(1, 2).flatten(2).float()) ** 2).mean()
        return loss

    def _codi(self, _):  # the recipe's (full logits); latentfast's is latentfast-codi's own step
        w, b = self.w, self.b
        B, T = w.micro_batch, w.completion_len  # T: the CoT teacher sequence; the student's is shorter
        dec, head = _parts(b.model)
        ids = _ids(self.V, B, T)
        q = max(1, T // 2)

        def ce(h, labels):
            return nn.functional.cross_entropy(head(h).float()[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

        with _amp(w):
            t_out = dec(input_ids=ids, output_hidden_states=True)
            loss = ce(t_out.last_hidden_state, ids)
            embed = dec.get_input_embeddings()
            e = embed(ids[:, :q])
            out = dec(inputs_embeds=e, use_cache=True, output_hidden_states=True)
            cache, h = out.cache, out.last_hidden_state[:, -1:]
            for _ in range(w.num_latent):  # latent steps: the projected last hidden state is the next input
                out = dec(inputs_embeds=b.extra(h).to(e.dtype), cache=cache, use_cache=True)
                cache, h = out.cache, out.last_hidden_state
            a = ids[:, -8:]
            out = dec(inputs_embeds=embed(a), cache=cache, use_cache=True, output_hidden_states=True)
            loss = loss + ce(out.last_hidden_state, a)
            for hs, ht in zip(out.hidden_states, t_out.hidden_states):  # CODI's distillation at the answer
                loss = loss + (hs[:, 0].float() - ht[:, -8].detach().float()).abs().mean()
        return loss


@contextlib.contextmanager
def balanced_moe():
    """MiniMind's MoE dispatch with every expert given an equal share of the (token, slot)
    pairs: its real split sizes are read on the host (``bincount().tolist()``), unknowable on
    fake tensors; a balanced router (what the auxiliary loss aims at) is the planned case."""
    from latentfast.models.minimind import moe

    orig = moe.sorted_dispatch

    def dispatch(x, topk_idx, topk_weight, experts):
        N, H = x.shape
        k, E = topk_idx.shape[1], len(experts)
        base, rem = divmod(N * k, E)
        counts = [base + (i < rem) for i in range(E)]
        order = topk_idx.reshape(-1).argsort(stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        grouped = moe._GatherSlots.apply(x, order, inverse, k).split(counts)
        weights = moe._Permute.apply(topk_weight.reshape(-1), order, inverse).split(counts)
        outs = [expert(xe, row_scale=we) for expert, xe, we in zip(experts, grouped, weights) if xe.shape[0]]
        return moe._Permute.apply(torch.cat(outs), inverse, order).view(N, k, H).sum(dim=1)

    moe.sorted_dispatch = dispatch
    try:
        yield
    finally:
        moe.sorted_dispatch = orig
