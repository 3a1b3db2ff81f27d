"""Running a trainer's own step for the planner: the loop's hooks, on fake tensors or real ones.

``prepare(trainer, mode)`` does what ``Trainer.fit`` does before its first step -- ``setup()``,
``build_model()``, ``optimizer_groups()`` -> ``make_optimizer()``, the schedule -- with
``latentfast.models.local.load_causal_lm`` substituted (``PlanLoader``: the tokenizer, and the
model built from its config alone, on the meta device then turned into fake tensors of ``mode``;
``mode=None``: real random weights, for validation), and ``data.reward_model.RewardModel.load``
substituted too (``PlanLoader.reward_model``: a reward model built from its folder's config.json
alone, scoring responses of the rollout's full length). ``run_step(trainer, phase)`` then runs one
optimizer step exactly as the loop does: ``batches(0)`` (RL: rollout, rewards, reference
log-probs), ``forward_backward`` (the loop's own method), ``before_optimizer_step`` and
``common.optimizer_step`` (clipping, AdamW, schedule). Nothing of the algorithm is written here.

What differs from a GPU run, and why:
- tensors live on (fake) CPU: fake tensors on ``cuda`` need the CUDA build of torch and a device
  for the backward (``fake.py``). The trainer is told the device is the CPU, so choices it makes
  from the device type are set in its config instead (``trainers.py``: bf16 weights / autocast as
  on CUDA); autocast runs as CPU autocast to bf16. (The GPU validation runs the same step on real
  CUDA tensors: ``prepare(..., device_type="cuda")``.)
- data: the trainer reads a data file the planner writes (``trainers.py``) whose rows fill the
  configured lengths -- every sequence at its maximum, the planned worst case -- and its tokenizer
  is the project tokenizer unless the model folder has one.
- values read on the host are unknowable on fake tensors: ``fake._Tracker`` answers them
  (scalars 1, booleans False: a rollout runs to its full length; a boolean mask selects all).
"""
from __future__ import annotations

import contextlib
import json
import math
import pathlib
import tempfile

import torch
from torch import nn

from latentfast.data.reward_model import RewardModel

PLAN_MODELS: dict = {}  # "plan:<n>" -> a config dict (named configs need no entry)


def model_key(model) -> str:
    """A string a trainer's ``--model_name`` flag can hold for ``model`` (a name, a path, or a
    config dict registered here)."""
    if isinstance(model, str):
        return model
    key = f"plan:{len(PLAN_MODELS)}"
    PLAN_MODELS[key] = dict(model)
    return key


def resolve_model(name):
    return PLAN_MODELS.get(name, name)


class PlanLoader:
    """``load_causal_lm``'s substitute: the tokenizer and a model built from the config alone;
    and ``RewardModel.load``'s (``reward_model``). ``response_tokens``: the length of a sampled
    response a reward model scores (the rollout's new tokens: it runs to its full length)."""

    def __init__(self, mode=None, response_tokens: int = 0):
        self.mode, self.response_tokens = mode, response_tokens

    def tokenizer(self, name):
        from latentfast.data import build_tokenizer

        path = pathlib.Path(str(name))
        if path.is_dir() and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            from transformers import AutoTokenizer

            from latentfast.models.local import from_local

            tok = from_local(AutoTokenizer, str(path))
        else:
            tok = build_tokenizer()
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok

    def config(self, name, tok, size="tiny", **overrides):
        if name == "tiny":
            from latentfast.models.tiny import tiny_config

            cfg = tiny_config(-(-len(tok) // 64) * 64, size, **overrides)
            cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
            return cfg
        from .models import hf_config

        return hf_config(resolve_model(name))

    def __call__(self, name, device, dtype=None, seed: int = 0, size: str = "tiny", **overrides):
        from transformers import AutoModelForCausalLM

        tok = self.tokenizer(name)
        cfg = self.config(name, tok, size, **overrides)
        dtype = dtype or torch.bfloat16  # load_causal_lm's default on CUDA, the planned device
        return tok, self.build(lambda: AutoModelForCausalLM.from_config(cfg, dtype=dtype), seed, device)

    def build(self, make, seed: int = 0, device=None):
        """``make()`` on real tensors moved to ``device`` (validation: CPU, or a real CUDA step), or
        on the meta device turned into fake CPU ones (``device`` is then the planned one: ignored)."""
        if self.mode is None:
            torch.manual_seed(seed)  # initialised on the CPU: the same weights on either device
            return make().to(device or "cpu")
        from .fake import fakeify

        with torch.device("meta"):
            m = make()
        return fakeify(m, self.mode, "cpu", {})  # one memo per model: tied weights stay tied


    def reward_model(self, path, device, dtype=None, trust_remote_code=False, scale=None):
        """A sequence-classification reward model (one score per text, no lm_head) from the folder's
        config.json alone; a config only ``trust_remote_code`` can build (InternLM2's reward model)
        becomes a Llama of its shapes."""
        from transformers import AutoConfig, AutoModelForSequenceClassification, LlamaConfig

        from latentfast.data.reward_model import REWARD_SCALE

        d = json.loads((pathlib.Path(path) / "config.json").read_text())
        try:
            cfg = AutoConfig.for_model(**d)
        except (KeyError, ValueError):  # a model type of its own code: a Llama of its shapes
            keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "vocab_size", "rms_norm_eps", "max_position_embeddings")
            cfg = LlamaConfig(**{k: d[k] for k in keys if k in d})
        cfg.num_labels = 1
        tok = self.tokenizer(path)
        cfg.pad_token_id = tok.pad_token_id
        dtype = dtype or getattr(torch, str(d.get("dtype") or d.get("torch_dtype") or "bfloat16"))
        model = self.build(lambda: AutoModelForSequenceClassification.from_config(cfg, dtype=dtype), device=device)
        return PlanRewardModel(model, tok, self.response_tokens, REWARD_SCALE if scale is None else scale)


class PlanRewardModel(RewardModel):
    """A reward model of the planner: every response it scores is ``response_tokens`` tokens long
    (sampled text is unknowable on fake tensors; the rollout runs to its full length, so do its
    responses: the planned worst case). Real and fake steps score the same texts."""

    def __init__(self, model, tok, response_tokens: int, scale: float):
        super().__init__(model, tok, scale=scale)
        per = len(tok(" 7" * 64, add_special_tokens=False).input_ids) / 64
        self.response = " 7" * math.ceil(response_tokens / per) if response_tokens else None

    def score(self, chats, batch_size: int = 8):
        if self.response is not None:
            chats = [c[:-1] + [{**c[-1], "content": self.response}] if c and c[-1]["role"] == "assistant" else c
                     for c in chats]
        return super().score(chats, batch_size)


@contextlib.contextmanager
def substituted(loader):
    from latentfast.data import reward_model
    from latentfast.models import local

    with local.substitute(loader), reward_model.substitute(loader.reward_model):
        yield


def _amp(bf16: bool, device_type: str = "cpu"):
    return (lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext


def prepare(trainer, loader: PlanLoader, bf16: bool = False, workdir: str | None = None, device_type: str = "cpu"):
    """What ``Trainer.fit`` does before the first step (no process group, no folder lock), models
    through ``loader`` (``PlanLoader(fake_mode)``, or ``PlanLoader(None)``: real tensors).
    ``device_type``: where the tensors live -- the CPU (fake steps, CPU validation) or, for the
    real-GPU validation (``validate.run_trainer_step(w, "cuda")``), ``cuda``."""
    from latentfast.train.common import warmup_schedule

    t = trainer
    t.device, t.rank, t.world = torch.device(device_type), 0, 1
    t.out = pathlib.Path(workdir or tempfile.mkdtemp(prefix="latentfast-plan-"))
    t.run_id, t.step, t._stream_offset, t.total = "plan", 0, 0, 1
    t.amp = _amp(bf16, device_type)
    t._plan_loader = loader
    with substituted(loader):
        torch.manual_seed(t.cfg.seed)
        t.setup()
        torch.manual_seed(t.cfg.seed)
        module = t.build_model()
    t.model = t.module = module
    t.optimizer = t.make_optimizer(t.optimizer_groups(module))
    t.scheduler = warmup_schedule(t.optimizer, 1, 0.0, "constant")


def init_optimizer_state(optimizers):
    """AdamW's states exist from the second step on: one zero-gradient step creates them."""
    for opt in optimizers:
        for g in opt.param_groups:
            for p in g["params"]:
                p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)


def run_step(trainer, phase=None, first: str = "data"):
    """One optimizer step through the loop's own hooks; ``phase(name)`` marks ``first`` (the
    batches: data, or an RL trainer's rollout) / train / optimizer (the per-phase peaks)."""
    from latentfast.train.common import optimizer_step

    t = trainer
    phase = phase or (lambda name: contextlib.nullcontext())
    with substituted(t._plan_loader), phase(first):
        micro = t.batches(0)
    with phase("train"):
        t.forward_backward(micro, 0)
        del micro
        t.before_optimizer_step()
    with phase("optimizer"):
        params = [p for g in t.optimizer.param_groups for p in g["params"]]
        optimizer_step(params, t.optimizer, t.scheduler, t.cfg.max_grad_norm)
        for opt in extra_optimizers(t):
            opt.step()
            opt.zero_grad(set_to_none=True)


def response_tokens(w) -> int:
    """The length of a response a reward model scores: the rollout's new tokens (RL), else 0."""
    return w.completion_len if w.rl else 0


def rollout_rows(t) -> int:
    """Sequences of one rollout: train/rl's generation batch (completions), or a MiniMind RL
    stage's micro-batch (prompts x --num_generations)."""
    c = t.cfg
    if hasattr(c, "max_gen_len"):
        return c.per_device_train_batch_size * getattr(c, "num_generations", 1)
    return c.per_device_train_batch_size * getattr(c, "generation_steps", 1)


def extra_optimizers(t) -> list:
    """Optimizers a trainer keeps besides the loop's (a critic's, ...)."""
    return [o for o in _objects(t, torch.optim.Optimizer) if o is not t.optimizer]


def _objects(root, kind, depth: int = 3) -> list:
    """Instances of ``kind`` reachable from ``root``'s attributes (lists, dicts, the trainer's
    helper objects), outermost first, each once."""
    seen, out, frontier = {id(root)}, [], [root]
    for _ in range(depth):
        nxt = []
        for obj in frontier:
            vals = list(obj.values()) if isinstance(obj, dict) else list(obj) if isinstance(obj, (list, tuple)) \
                else list(vars(obj).values()) if hasattr(obj, "__dict__") and not isinstance(obj, nn.Module) else []
            for v in vals:
                if id(v) in seen or isinstance(v, (str, bytes, int, float, torch.Tensor, type)):
                    continue
                seen.add(id(v))
                if isinstance(v, kind):
                    out.append(v)
                elif isinstance(v, (list, tuple, dict)) or (hasattr(v, "__dict__") and
                                                            type(v).__module__.startswith("latentfast")):
                    nxt.append(v)
        frontier = nxt
    return out


def modules(t) -> tuple[nn.Module, list]:
    """(the trained module, the other models the trainer holds: teachers, references, reward
    models), each once."""
    inside = {id(m) for m in t.module.modules()}
    trained = {id(p) for p in t.module.parameters()}
    others = []
    for m in _objects(t, nn.Module):
        if all(id(p) in trained for p in m.parameters()):  # a wrapper of the trained model's parts
            inside.update(id(x) for x in m.modules())
        elif id(m) not in inside:
            others.append(m)
            inside.update(id(x) for x in m.modules())
    return t.module, others


def main_config(t):
    """The HF config of the trained model (its layers / heads for the rollout cache)."""
    for m in t.module.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "num_hidden_layers"):
            return cfg
    raise TypeError(f"{type(t).__name__}: no model config found in the trained module")


def live_bytes(t) -> int:
    """Bytes of every parameter, buffer and optimizer state the trainer holds (real tensors)."""
    main, others = modules(t)
    tensors = [x for m in [main, *others] for x in list(m.parameters()) + list(m.buffers())]
    tensors += [v for o in [t.optimizer, *extra_optimizers(t)] for st in o.state.values() for v in st.values()
                if torch.is_tensor(v)]
    return storage_bytes(tensors)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (tied weights and views counted once)."""
    storages = {x.untyped_storage().data_ptr(): x.untyped_storage().nbytes() for x in tensors}
    return sum(storages.values())
