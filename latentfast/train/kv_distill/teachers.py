"""Teachers of a KV-distillation run: loading, and their targets per batch.

    teachers = load_teachers_from_config(cfg, student.config, tok, kv_layers="all", device=dev)
    targets = [t.targets(batch, need_importance=..., stats=..., compression=...) for t in teachers]

``--teacher_model PATH`` is a list of one (``single_teacher``: name ``teacher``, a linear
adapter, static weight 1). An online teacher runs one no-grad forward per step (under
``inference_mode``, in its ``dtype``; one teacher's activations at a time, only its targets
are kept); an offline one (``source: offline:<dir>``) reads what ``latentfast-kv-cache``
wrote. Both return the same dict, so the loss cannot tell them apart:

    kv          [(K, V) (B, H, T, d) per layer pair]   (full targets), or
    rkv         [compressed target per layer pair]      (--kv_compression rkv)
    importance  (B, T) the teacher's attention importance, when asked for
    nll/entropy (B,) the teacher's mean NLL / predictive entropy on the gold answer tokens
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers import AutoConfig

from latentfast.data.kv_cache import KVCacheReader
from latentfast.hf.capture import KVCapture
from latentfast.models.local import from_local, load_causal_lm
from latentfast.nn.kv_adapter import layer_map
from latentfast.nn.teacher_weighting import answer_nll_entropy
from latentfast.ops import attention_token_importance
from latentfast.ops.kv_compression import cot_answer_spans, rkv_compress

from .spec import TeachersConfig, TeacherSpec


@dataclass
class Compression:
    slots: int = 24
    lam: float = 0.1


def compression_of(cfg) -> Compression | None:
    """``--kv_compression rkv`` as a ``Compression`` (None: full targets)."""
    return Compression(cfg.kv_slots, cfg.kv_lambda) if cfg.kv_compression == "rkv" else None


def single_teacher(model: str) -> TeachersConfig:
    """``--teacher_model PATH``: a teachers list of one, at static weight 1."""
    return TeachersConfig([TeacherSpec(model=model, name="teacher", kv_adapter="linear", weight=1.0)])


def _detached(x):
    """Inference tensors cannot be saved for the student's backward: plain copies."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, dict):
        return {k: _detached(v) for k, v in x.items()}
    return type(x)(_detached(v) for v in x)


def teacher_targets(teacher, capture: KVCapture, batch: dict, layers, *, importance_layer: int | None = None,
                    stats: bool = False, compression: Compression | None = None, hidden: bool = False,
                    amp=contextlib.nullcontext) -> dict:
    """One teacher's targets for ``batch`` (``data.encode``'s dict) at teacher ``layers``
    (``hidden``: also its hidden states, for CKA / CODI)."""
    out = {"kv": None, "rkv": None, "importance": None, "nll": None, "entropy": None, "hidden": None}
    mask = batch["attention_mask"]
    with torch.inference_mode(), capture, amp():
        o = teacher.model(input_ids=batch["input_ids"], attention_mask=mask, output_hidden_states=hidden)
        if hidden:
            out["hidden"] = o.hidden_states
        if compression is not None:
            cot, start = cot_answer_spans(batch["targets"], batch["answer_pos"])
            out["rkv"] = [rkv_compress(*capture.qk(L), capture.kv(L)[1], attention_mask=mask, cot_mask=cot,
                                       answer_start=start, slots=compression.slots, lam=compression.lam)
                          for L in layers]
        else:
            out["kv"] = [capture.kv(L) for L in layers]
        if importance_layer is not None:
            out["importance"] = attention_token_importance(*capture.qk(importance_layer), attention_mask=mask)
        if stats:
            out["nll"], out["entropy"] = answer_nll_entropy(teacher.get_output_embeddings(), o.last_hidden_state,
                                                            batch["targets"])
    capture.clear()
    return _detached(out)


class Teacher:
    """One teacher: its spec, config, layer pairs and either a frozen model (online) or a
    cache reader (offline)."""

    def __init__(self, spec: TeacherSpec, config, pairs, model=None, reader: KVCacheReader | None = None,
                 importance_layer: int = -1, compression: Compression | None = None):
        self.spec, self.config, self.pairs = spec, config, list(pairs)
        self.model, self.reader = model, reader
        self.layers = [t for _, t in self.pairs]
        self.importance_layer = importance_layer % config.num_hidden_layers
        self.compression = compression
        self.memo = None  # --compare: {batch key: targets}, shared by every run (same sample stream)
        self.warm_s = None  # the demo's warm-up seconds (--compare's table)
        self.capture = None
        if model is not None:
            q_layers = set(self.layers) if compression is not None else set()
            self.capture = KVCapture(model, self.layers, sorted(q_layers | {self.importance_layer}))

    @property
    def name(self) -> str:
        return self.spec.name

    def targets(self, batch: dict, *, need_importance: bool, stats: bool, hidden: bool = False,
                amp=contextlib.nullcontext) -> dict:
        if self.memo is not None:  # computed once for all runs, with the statistics every rule may read
            key = (tuple(batch["row_ids"]), need_importance, hidden)
            if key not in self.memo:
                self.memo[key] = self._targets(batch, need_importance=need_importance, stats=True, hidden=hidden,
                                               amp=amp)
            return self.memo[key]
        return self._targets(batch, need_importance=need_importance, stats=stats, hidden=hidden, amp=amp)

    def _targets(self, batch: dict, *, need_importance: bool, stats: bool, hidden: bool, amp) -> dict:
        if self.reader is not None:
            if hidden:
                raise ValueError(f"teacher {self.name!r} is offline (source {self.spec.source}): its cache holds no "
                                 f"hidden states, which --cka_weight / --codi_weight need; use source: online")
            return self.reader.batch(batch["row_ids"], batch["input_ids"], batch["attention_mask"], self.layers,
                                     batch["input_ids"].device)
        return teacher_targets(self.model, self.capture, batch, self.layers,
                               importance_layer=self.importance_layer if need_importance else None, stats=stats,
                               compression=self.compression, hidden=hidden, amp=amp)

    def remove(self):
        if self.capture is not None:
            self.capture.remove()


def load_teachers_from_config(cfg: TeachersConfig, student_config, tok, *, kv_layers="all", device="cpu",
                              importance_layer: int = -1, compression: Compression | None = None,
                              need_importance: bool = False, need_stats: bool = False) -> list[Teacher]:
    """Build every teacher of ``cfg``: online ones loaded frozen in their dtype (tokenizer
    checked against the student's), offline ones as cache readers (checked for the layers,
    importance and statistics this run needs)."""
    out = []
    for spec in cfg.teachers:
        if spec.offline_dir is not None:
            config = from_local(AutoConfig, spec.model)
            pairs = layer_map(student_config.num_hidden_layers, config.num_hidden_layers, spec.layer_map, kv_layers)
            reader = KVCacheReader(spec.offline_dir)
            reader.check([t for _, t in pairs], need_importance, need_stats)
            if bool(reader.compressed) != (compression is not None):
                raise ValueError(f"teacher {spec.name!r}: offline cache {spec.offline_dir} was built "
                                 f"{'with' if reader.compressed else 'without'} --kv_compression rkv, this run "
                                 f"{'uses' if compression is not None else 'does not use'} it")
            out.append(Teacher(spec, config, pairs, reader=reader, importance_layer=importance_layer))
            continue
        tok_t, model = load_causal_lm(spec.model, device, dtype=spec.torch_dtype(device))
        check_same_tokenizer(tok, tok_t, spec.name)
        out.append(online_teacher(spec, model, student_config, kv_layers=kv_layers, importance_layer=importance_layer,
                                  compression=compression))
    return out


def online_teacher(spec: TeacherSpec, model, student_config, *, kv_layers="all", importance_layer: int = -1,
                   compression: Compression | None = None) -> Teacher:
    """A ``Teacher`` around a model already in memory (frozen here): the Python API and the demo."""
    model.eval().requires_grad_(False)
    pairs = layer_map(student_config.num_hidden_layers, model.config.num_hidden_layers, spec.layer_map, kv_layers)
    return Teacher(spec, model.config, pairs, model=model, importance_layer=importance_layer, compression=compression)


def check_same_tokenizer(tok_s, tok_t, name: str = "teacher") -> None:
    probe = "Question: Tom has 12 apples.\nAnswer:\n12*3=36\n#### 36"
    if len(tok_s) != len(tok_t) or tok_s(probe)["input_ids"] != tok_t(probe)["input_ids"]:
        raise SystemExit(f"{name} and the student must share a tokenizer (KV distillation aligns token positions)")
