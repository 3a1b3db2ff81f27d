"""CODI (Shen et al. 2025): an explicit-CoT teacher and a latent student sharing one model.

Teacher sequence:  prompt  step_1\\n step_2\\n ...  #### N <eos>
Student sequence:  prompt  step_1\\n <bot> z z z z z z <eot> step_3\\n ...  #### N <eos>

A run of latent steps is replaced by ``<bot>``, ``num_latent`` latent positions and
``<eot>``; each latent position's input embedding is ``prj(h)`` with ``h`` the
last-layer hidden state of the position before it (``prj`` = Linear -> GELU ->
Linear -> LayerNorm, the original CODI module names, so CODI checkpoints load).
Pure CODI is the case "every step latent"; seed note 003's hybrid samples mix
explicit and latent steps.

The model gives hidden states (``CODIModel.forward`` -> ``CODIOutput``); the training loss
is ``latentfast.nn.codi.CODIObjective`` on them:

    loss = CE(student's explicit tokens) + distill_loss_factor * CODILoss(hidden at the
           token before the answer, every hidden state incl. the embeddings, smooth L1;
           the original CODI's defaults) + ref_loss_factor * CE(teacher's full explicit sequence)

Batching hybrid samples: the student batch is laid out as segments
``E0 L1 E1 L2 ... EM`` (token chunks E, latent blocks L). A sample with fewer blocks
or shorter chunks leaves *holes* (attention mask 0, position ids counted over real
tokens only), so every sample sees exactly its own sequence while token chunks still
run as one batched forward and each latent column as one batched step, through one
KV cache. ``tests/test_codi.py`` checks this against per-sample forwards.
"""
from __future__ import annotations

import dataclasses
import pathlib

import torch
from torch import nn

from latentfast.data import ANSWER_MARKER, BOT, EOT, format_prompt
from latentfast.hf import adapter
from latentfast.hf.adapter import new_cache  # noqa: F401  (re-exported: callers build caches for CODIModel.run)
from latentfast.runtime.checkpoint import latest

LATENT = -1  # placeholder id of a latent position in an encoded student sequence


# ----------------------------------------------------------------------------- data
def split_answer(answer: str, marker: str = ANSWER_MARKER) -> tuple[list[str], str]:
    """GSM8K answer -> (reasoning step lines, final answer text after the marker)."""
    if marker not in answer:
        raise ValueError(f"answer has no {marker!r} line: {answer[-80:]!r}")
    body, final = answer.rsplit(marker, 1)
    steps = [s.strip() for s in body.strip().split("\n") if s.strip()]
    return steps, final.strip().split("\n", 1)[0]


CODI_PAD = "[PAD]"  # fills the original CODI's pad slot (id = vocab_size) when the tokenizer has no token there


def prepare_tokenizer(tok, lm=None):
    """Make sure ``tok`` has pad/``<|bot|>``/``<|eot|>`` ids and the ``*_id`` attributes used here.

    A tokenizer that already has the two tokens (the project's) keeps its ids. For a stock
    HF model the original CODI's layout is used, so its checkpoints load: with
    ``V = config.vocab_size``, the embeddings grow to ``V + 3`` rows (pad slot ``V``,
    ``<bot>`` ``V + 1``, ``<eot>`` ``V + 2``); the tokens are registered in the tokenizer
    when its vocabulary ends at ``V`` (Llama, GPT-2), else only the ids are set (decoding
    skips them)."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    known = all(tok.convert_tokens_to_ids(t) not in (None, tok.unk_token_id) for t in (BOT, EOT))
    if known:
        tok.bot_token_id, tok.eot_token_id = tok.convert_tokens_to_ids(BOT), tok.convert_tokens_to_ids(EOT)
        rows = len(tok)
    else:
        if getattr(tok, "codi_vocab_size", None) is None:  # first call: the model's original vocabulary
            tok.codi_vocab_size = lm.config.vocab_size if lm is not None else len(tok)
        V = tok.codi_vocab_size
        if len(tok) > V:
            raise ValueError(f"tokenizer has {len(tok)} tokens, more than the model's vocab_size {V}")
        if len(tok) == V:
            tok.add_special_tokens({"additional_special_tokens": [CODI_PAD, BOT, EOT]})
            if (tok.convert_tokens_to_ids(BOT), tok.convert_tokens_to_ids(EOT)) != (V + 1, V + 2):
                raise ValueError(f"could not place {BOT}/{EOT} at ids {V + 1}/{V + 2} (a token named {CODI_PAD}, "
                                 f"{BOT} or {EOT} is already in the tokenizer)")
        tok.bot_token_id, tok.eot_token_id = V + 1, V + 2
        rows = V + 3
    tok.answer_marker_ids = tok(ANSWER_MARKER, add_special_tokens=False)["input_ids"]
    if lm is not None and lm.get_input_embeddings().weight.shape[0] < rows:
        lm.resize_token_embeddings(rows)
    return tok


def encode_example(tok, question: str, steps: list[str], final: str, latent=None, num_latent: int = 6,
                   eos_delimiters: bool = False) -> dict:
    """Token ids for one sample. ``latent[i]`` marks step ``i`` as compressed (default:
    none, i.e. pure CoT). Returns teacher/student ``ids``, ``labels`` (True where the
    token is a training target), ``distill`` (index of the last answer-marker token:
    the token right before the answer, where CODI aligns hidden states) and the
    teacher's ``step_spans`` ([start, end) of each step's tokens).

    ``eos_delimiters`` (the original CODI without ``--remove_eos``): an ``<eos>`` after
    the prompt (not a target, part of the question) and one before the answer (a
    target: after the CoT in the teacher, after the last step or ``<eot>`` in the student)."""
    latent = [False] * len(steps) if latent is None else list(latent)
    if len(latent) != len(steps):
        raise ValueError(f"{len(latent)} latent flags for {len(steps)} steps")
    prompt = tok(format_prompt(question))["input_ids"]
    step_ids = [tok(s + "\n", add_special_tokens=False)["input_ids"] for s in steps]
    answer = tok.answer_marker_ids + tok(" " + final, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    if eos_delimiters:
        prompt = list(prompt) + [tok.eos_token_id]
        answer = [tok.eos_token_id] + answer
    n_marker = len(tok.answer_marker_ids)
    n_before = 1 if eos_delimiters else 0  # answer tokens before the marker

    t_ids = list(prompt) + [i for s in step_ids for i in s] + answer
    spans, pos = [], len(prompt)
    for s in step_ids:
        spans.append((pos, pos + len(s)))
        pos += len(s)
    t_lab = [False] * len(prompt) + [True] * (len(t_ids) - len(prompt))
    s_ids, s_lab = list(prompt), [False] * len(prompt)
    i = 0
    while i < len(steps):
        if latent[i]:
            while i < len(steps) and latent[i]:  # one block per run of latent steps
                i += 1
            block = [tok.bot_token_id] + [LATENT] * num_latent + [tok.eot_token_id]
            s_ids += block
            s_lab += [False] * len(block)  # <bot>/<eot> are inserted by the decoder, not predicted
        else:
            s_ids += step_ids[i]
            s_lab += [True] * len(step_ids[i])
            i += 1
    s_ids += answer
    s_lab += [True] * len(answer)
    d = n_before + n_marker - len(answer) - 1  # last marker token, from the end
    return {"teacher_ids": t_ids, "teacher_labels": t_lab, "teacher_distill": len(t_ids) + d,
            "teacher_step_spans": spans,
            "student_ids": s_ids, "student_labels": s_lab, "student_distill": len(s_ids) + d,
            "num_latent_blocks": s_ids.count(tok.bot_token_id) if num_latent else 0}


def _targets(ids, labels):
    """Next-token targets at the predicting positions (-100 where nothing is learnt)."""
    return [ids[t + 1] if labels[t + 1] else -100 for t in range(len(ids) - 1)] + [-100]


def collate(examples: list[dict], pad_id: int) -> dict:
    """Teacher tensors (right-padded) and the student's segment layout (see module doc)."""
    B = len(examples)
    T = max(len(e["teacher_ids"]) for e in examples)
    t_ids = torch.full((B, T), pad_id, dtype=torch.long)
    t_mask = torch.zeros(B, T, dtype=torch.long)
    t_tgt = torch.full((B, T), -100, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e["teacher_ids"])
        t_ids[b, :n] = torch.tensor(e["teacher_ids"])
        t_mask[b, :n] = 1
        t_tgt[b, :n] = torch.tensor(_targets(e["teacher_ids"], e["teacher_labels"]))
    out = {"teacher_ids": t_ids, "teacher_mask": t_mask, "teacher_targets": t_tgt,
           "teacher_distill": torch.tensor([e["teacher_distill"] for e in examples])}

    # student: split each sequence into chunks E0 L1 E1 ... (canonical slots 0..2M)
    chunks = []
    for e in examples:
        ids, cs, cur, t = e["student_ids"], [], [], 0
        while t < len(ids):
            if ids[t] == LATENT:
                cs.append(cur)
                start = t
                while t < len(ids) and ids[t] == LATENT:
                    t += 1
                cs.append(list(range(start, t)))
                cur = []
            else:
                cur.append(t)
                t += 1
        cs.append(cur)
        chunks.append(cs)
    n_slots = max(len(c) for c in chunks)
    widths = [max((len(c[j]) for c in chunks if j < len(c)), default=0) for j in range(n_slots)]
    starts = [sum(widths[:j]) for j in range(n_slots)]
    W = sum(widths)
    s_ids = torch.full((B, W), pad_id, dtype=torch.long)
    valid = torch.zeros(B, W, dtype=torch.long)
    latent = torch.zeros(B, W, dtype=torch.bool)
    tgt = torch.full((B, W), -100, dtype=torch.long)
    distill = torch.zeros(B, dtype=torch.long)
    for b, (e, cs) in enumerate(zip(examples, chunks)):
        targets = _targets(e["student_ids"], e["student_labels"])
        for j, idx in enumerate(cs):
            for off, t in enumerate(idx):
                col = starts[j] + off
                valid[b, col] = 1
                if e["student_ids"][t] == LATENT:
                    latent[b, col] = True
                else:
                    s_ids[b, col] = e["student_ids"][t]
                tgt[b, col] = targets[t]
                if t == e["student_distill"]:
                    distill[b] = col
    segments = [(starts[j], starts[j] + widths[j], j % 2 == 1) for j in range(n_slots) if widths[j] > 0]
    out.update(student_ids=s_ids, student_valid=valid, student_latent=latent, student_targets=tgt,
               student_positions=adapter.positions_from_mask(valid), student_distill=distill, segments=segments)
    return out


# ----------------------------------------------------------------------------- model
@dataclasses.dataclass
class CODIOutput:
    """What ``CODIModel.forward`` gives the loss (``latentfast.nn.codi.CODIObjective``).

    ``teacher_hidden``: the teacher pass's hidden states (embeddings + every block, the last
    after the final norm), ``teacher_last`` its ``last_hidden_state``; ``student_hidden``: the
    student pass's, over the segment layout (None: no student row); ``student_index``: the
    batch rows the student rows are; ``aux``: 0 in the graph of ``prj``'s parameters when no
    latent position used them (DDP: every parameter gets a gradient), else None."""

    teacher_hidden: tuple
    teacher_last: torch.Tensor
    student_hidden: tuple | None = None
    student_index: torch.Tensor | slice | None = None
    aux: torch.Tensor | None = None


class CODIModel(nn.Module):
    """``codi``: the causal LM (optionally PEFT-wrapped); ``prj``: the latent projection.
    ``forward`` gives hidden states (``CODIOutput``); the training loss is
    ``latentfast.nn.codi.CODIObjective`` on them.

    Args:
        num_latent: latent positions per latent block.
        prj_dim: hidden width of ``prj`` (2048 at 1B scale); ``use_prj=False`` feeds the
            raw last hidden state back.
    """

    def __init__(self, lm, bot_id: int, eot_id: int, num_latent: int = 6, prj_dim: int = 2048, use_prj: bool = True,
                 prj_dropout: float = 0.0):
        super().__init__()
        self.codi = lm
        self.bot_id, self.eot_id, self.num_latent = bot_id, eot_id, num_latent
        dim = lm.config.hidden_size
        self.prj = None
        if use_prj:  # same layout and names as CODI's model.py: prj.1 / prj.3 / prj.ln
            self.prj = nn.Sequential(nn.Dropout(prj_dropout), nn.Linear(dim, prj_dim), nn.GELU(),
                                     nn.Linear(prj_dim, dim))
            self.prj.add_module("ln", nn.LayerNorm(dim))

    # -- pieces -----------------------------------------------------------------
    @property
    def lm(self) -> nn.Module:
        """The HF causal LM underneath any PEFT wrapper."""
        return adapter.unwrap(self.codi)

    @property
    def base(self) -> nn.Module:
        return self.lm.model

    @property
    def config(self):
        return self.lm.config

    @property
    def head(self) -> nn.Module:
        """The lm_head (the loss applies it only where there are targets)."""
        return self.lm.get_output_embeddings()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h)

    def add_lora(self, rank: int, alpha: int | None = None, dropout: float = 0.1):
        """LoRA on every linear of the blocks (CODI trains r=128, alpha=32 adapters)."""
        self.codi = adapter.add_lora(self.codi, rank, alpha, dropout)
        return self

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids)

    def latent_embed(self, h: torch.Tensor) -> torch.Tensor:
        """Input embedding of a latent position from the previous last hidden state."""
        return self.prj(h) if self.prj is not None else h

    def run(self, embeds, attention_mask, position_ids, cache=None, hidden_states: bool = False):
        """One decoder call on ``inputs_embeds``; returns the HF output (``last_hidden_state``
        is after the final norm; ``hidden_states`` has the embeddings + every block)."""
        return adapter.run_decoder(self.codi, embeds, attention_mask, position_ids, cache, hidden_states,
                                   transformer=self.base)

    # -- passes -------------------------------------------------------------------
    def teacher_forward(self, batch):
        """Explicit CoT pass: the HF output (``last_hidden_state``, ``hidden_states``)."""
        ids, mask = batch["teacher_ids"], batch["teacher_mask"]
        return self.run(self.embed(ids), mask, adapter.positions_from_mask(mask), hidden_states=True)

    def student_forward(self, batch) -> tuple:
        """Hybrid pass over the segment layout: the hidden-state tuple."""
        ids, valid, pos = batch["student_ids"], batch["student_valid"], batch["student_positions"]
        B = ids.shape[0]
        cache = new_cache(self.config)
        per_layer, last_h = None, None
        for start, end, is_latent in batch["segments"]:
            cols = [(start, end)] if not is_latent else [(c, c + 1) for c in range(start, end)]
            for s, e in cols:
                if is_latent:
                    emb = self.latent_embed(last_h)[:, None]
                    # holes of samples without this block must not carry a stale state forward
                    emb = torch.where(valid[:, s:e, None].bool(), emb, torch.zeros_like(emb))
                else:
                    emb = self.embed(ids[:, s:e])
                out = self.run(emb, valid[:, :e], pos[:, s:e], cache=cache, hidden_states=True)
                hs = out.hidden_states
                per_layer = [[h] for h in hs] if per_layer is None else [p + [h] for p, h in zip(per_layer, hs)]
                # last valid column of this call, per sample (keep the old state where none)
                v = valid[:, s:e]
                has = v.any(1)
                last = (v * torch.arange(1, e - s + 1, device=v.device)).argmax(1)
                cur = out.last_hidden_state[torch.arange(B, device=v.device), last]
                last_h = cur if last_h is None else torch.where(has[:, None], cur, last_h)
        return tuple(torch.cat(p, dim=1) for p in per_layer)

    def forward(self, batch: dict, student_index: torch.Tensor | None = None) -> CODIOutput:
        """Teacher and student hidden states. ``student_index``: rows of the batch that get the
        latent student pass (the others are pure-CoT samples: teacher only); default all."""
        t = self.teacher_forward(batch)
        out = CODIOutput(t.hidden_states, t.last_hidden_state)
        has_student = batch.get("segments") is not None and batch["student_ids"].shape[0] > 0
        if has_student:
            out.student_hidden = self.student_forward(batch)
            out.student_index = student_index if student_index is not None else slice(None)
        if self.prj is not None and (not has_student or not bool(batch["student_latent"].any())):
            zero = t.last_hidden_state.new_zeros((), dtype=torch.float32)
            out.aux = adapter.keep_in_graph(zero, self.prj.parameters())  # DDP: every param gets a grad
        return out


def split_batch(examples: list[dict], cot_only: list[bool], pad_id: int) -> tuple[dict, torch.Tensor]:
    """Collate the teacher side of every example and the student side of the non-CoT ones.
    Returns (batch, student_index) for ``CODIModel.forward``."""
    batch = collate(examples, pad_id)
    keep = [i for i, c in enumerate(cot_only) if not c]
    if len(keep) == len(examples):
        return batch, torch.arange(len(examples))
    if not keep:
        batch["segments"] = None
        batch["student_ids"] = batch["student_ids"][:0]
        return batch, torch.zeros(0, dtype=torch.long)
    student = collate([examples[i] for i in keep], pad_id)
    for k, v in student.items():
        if k.startswith("student_") or k == "segments":
            batch[k] = v
    return batch, torch.tensor(keep)


# ----------------------------------------------------------------------------- weights
PEFT_PREFIX = "codi.base_model.model."


def _checkpoint_file(path: str) -> tuple[pathlib.Path, bool]:
    """(weights file, whether it is one of our trainer checkpoints)."""
    p = pathlib.Path(path)
    if p.is_dir() and not (p / "trainer_state.json").exists():
        ck = latest(str(p))
        if ck is not None:
            p = pathlib.Path(ck)
    if p.is_file():
        return p, (p.parent / "trainer_state.json").exists()
    for name in ("model.safetensors", "pytorch_model.bin"):
        if p.is_dir() and (p / name).exists():
            return p / name, (p / "trainer_state.json").exists()
    raise FileNotFoundError(f"no model.safetensors / pytorch_model.bin under {path}")


def _map_key(k: str, own) -> str | None:
    """A checkpoint key as this model names it: PEFT-wrapped (``codi.base_model.model.*``,
    LoRA'd linears under ``.base_layer``) or not, either way round."""
    if k in own:
        return k
    if k.startswith("codi.") and not k.startswith(PEFT_PREFIX):  # plain checkpoint, PEFT model
        rest = k[len("codi."):]
        head, _, leaf = rest.rpartition(".")
        for cand in (PEFT_PREFIX + rest, f"{PEFT_PREFIX}{head}.base_layer.{leaf}"):
            if cand in own:
                return cand
    if k.startswith(PEFT_PREFIX) and "codi." + k[len(PEFT_PREFIX):] in own:  # PEFT checkpoint, plain model
        return "codi." + k[len(PEFT_PREFIX):]
    return None


def load_weights(model: CODIModel, path: str, strict: bool = True) -> dict:
    """Restore a CODI model from one of our checkpoints (``checkpoint-N`` dir or an output
    dir holding them) or an original CODI ``pytorch_model.bin`` / ``model.safetensors``
    (the original's ``CODI`` module state: ``codi.*``, ``codi.base_model.model.*`` with
    LoRA, and ``prj.*``). Every key is accounted for: loaded, or a missing one that is
    the tied output embedding, a LoRA adapter the (non-LoRA) checkpoint cannot have, or
    (our trainable-only checkpoints) a frozen base weight kept from the base model;
    ``strict`` raises on anything else, and on keys the model does not have.
    Returns {'loaded', 'missing', 'unexpected', 'tied', 'fresh_lora', 'frozen'} (key lists)."""
    f, ours = _checkpoint_file(path)
    if f.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(f))
    else:
        sd = torch.load(str(f), map_location="cpu", weights_only=True)
    own = model.state_dict()
    ckpt_lora = sorted({v.shape[0] for k, v in sd.items() if ".lora_A." in k})
    model_lora = any(".lora_A." in k for k in own)
    if ckpt_lora and not model_lora:
        raise ValueError(f"{f} holds LoRA adapters (rank {ckpt_lora[0]}): build the model with them "
                         f"(trainer: --use_lora True --lora_r {ckpt_lora[0]} --lora_alpha <the run's alpha>; "
                         f"eval: --lora_rank {ckpt_lora[0]} --lora_alpha <alpha>)")
    mapped, unexpected = {}, []
    for k, v in sd.items():
        m = _map_key(k, own)
        if m is None:
            unexpected.append(k)
            continue
        if tuple(v.shape) != tuple(own[m].shape):
            hint = ""
            if m.endswith(("embed_tokens.weight", "lm_head.weight", "wte.weight")):
                hint = (" (the original CODI resizes the embeddings to vocab_size + 3: pad, <bot>, <eot>; is it "
                        "the same base model?)")
            elif ".lora_" in m:
                hint = " (a different LoRA rank: pass the checkpoint's)"
            raise ValueError(f"{f}: {k} has shape {tuple(v.shape)}, the model's {m} {tuple(own[m].shape)}{hint}")
        mapped[m] = v
    if not any(not k.startswith("prj.") for k in mapped):
        raise ValueError(f"{f}: no model key matches this model ({len(unexpected)} unexpected keys, e.g. "
                         f"{unexpected[:3]})")
    missing = [k for k in own if k not in mapped]
    loaded_ptrs = {own[k].data_ptr() for k in mapped}
    tied = [k for k in missing if own[k].data_ptr() in loaded_ptrs]  # shares storage with a loaded key
    fresh_lora = [k for k in missing if ".lora_" in k and not ckpt_lora]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = [k for k in missing if ours and k not in trainable and k not in tied and k not in fresh_lora]
    rest = [k for k in missing if k not in tied and k not in fresh_lora and k not in frozen]
    if strict and (rest or unexpected):
        def few(keys):
            return ", ".join(keys[:5]) + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "")
        raise ValueError(f"{f} does not match the model: " + "; ".join(
            f"{what}: {few(keys)}" for what, keys in (("missing", rest), ("unexpected", unexpected)) if keys))
    model.load_state_dict(mapped, strict=False)
    return {"loaded": sorted(mapped), "missing": rest, "unexpected": unexpected, "tied": tied,
            "fresh_lora": fresh_lora, "frozen": frozen}
