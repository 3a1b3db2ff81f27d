"""Offline teacher KV targets: sharded safetensors written once, read back per batch.

    w = KVCacheWriter(dir, meta={"teacher": "eq", "layers": [1, 5], ...}, shard_size=512)
    w.add_batch(row_ids, targets, input_ids, attention_mask)   # targets as teacher_targets returns them
    w.close()                                                  # writes index.json
    r = KVCacheReader(dir)
    targets = r.batch(row_ids, input_ids, attention_mask, layers=[1, 5], device=dev)

Layout: ``index.json`` (meta, which shard holds each row) and ``shard-00000.safetensors``...
Per row ``r``, unpadded: ``r.ids`` (T,) the token ids (checked on read, so a cache built
from other data or another tokenizer fails loudly), ``r.k<L>``/``r.v<L>`` (H, T, d) per
teacher layer L, or with compression ``r.ck<L>``/``r.cv<L>`` (H, M, d), ``r.ci<L>`` kept
positions and ``r.cm<L>`` valid slots; optional ``r.imp`` (T,) importance (times the padded length, which
``attention_token_importance`` divides by) and
``r.nll``/``r.ent`` (answer NLL / entropy). Read back, padding positions are zeros (the
loss masks them), so a cached run computes the same loss as an online one.
"""
from __future__ import annotations

import json
import pathlib

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from latentfast.files import write_json

VERSION = 1


class KVCacheWriter:
    def __init__(self, out_dir, meta: dict, shard_size: int = 512, dtype: torch.dtype = torch.bfloat16):
        self.dir = pathlib.Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.meta = dict(meta, version=VERSION, dtype=str(dtype).replace("torch.", ""))
        self.shard_size, self.dtype = int(shard_size), dtype
        self.rows: dict[int, int] = {}
        self._buf: dict[str, torch.Tensor] = {}
        self._n = 0
        self._shard = 0

    def _flush(self):
        if self._buf:
            save_file(self._buf, str(self.dir / f"shard-{self._shard:05d}.safetensors"))
            self._buf, self._n = {}, 0
            self._shard += 1

    def add_batch(self, row_ids, targets: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        layers = self.meta["layers"]
        lengths = attention_mask.sum(1).tolist()
        for b, (row, T) in enumerate(zip(row_ids, lengths)):
            row, T = int(row), int(T)
            if row in self.rows or any(k.startswith(f"{row}.") for k in self._buf):
                raise ValueError(f"row {row} added twice to the KV cache")
            t = {f"{row}.ids": input_ids[b, :T].to(torch.int32)}
            if targets.get("rkv") is not None:
                for L, c in zip(layers, targets["rkv"]):
                    t[f"{row}.ck{L}"], t[f"{row}.cv{L}"] = c["k"][b].to(self.dtype), c["v"][b].to(self.dtype)
                    t[f"{row}.ci{L}"], t[f"{row}.cm{L}"] = c["index"][b].to(torch.int32), c["mask"][b].to(torch.uint8)
            else:
                for L, (k, v) in zip(layers, targets["kv"]):
                    t[f"{row}.k{L}"], t[f"{row}.v{L}"] = k[b, :, :T].to(self.dtype), v[b, :, :T].to(self.dtype)
            if targets.get("importance") is not None:  # per-head column sums: free of the padded length
                t[f"{row}.imp"] = targets["importance"][b, :T].float() * input_ids.shape[1]
            for key in ("nll", "entropy"):
                if targets.get(key) is not None:
                    t[f"{row}.{key[:3]}"] = targets[key][b:b + 1].float()
            self._buf.update({k: v.detach().cpu().contiguous() for k, v in t.items()})
            self.rows[row] = self._shard
            self._n += 1
            if self._n >= self.shard_size:
                self._flush()

    def close(self) -> None:
        self._flush()
        index = {"meta": self.meta, "num_shards": self._shard, "rows": {str(r): s for r, s in self.rows.items()}}
        write_json(self.dir / "index.json", index, indent=1)  # atomic: a killed run leaves no half index


class KVCacheReader:
    def __init__(self, cache_dir):
        self.dir = pathlib.Path(cache_dir)
        path = self.dir / "index.json"
        if not path.is_file():
            raise FileNotFoundError(f"offline KV cache {str(cache_dir)!r}: no index.json (write one with "
                                    f"latentfast-kv-cache --teachers teachers.yaml)")
        index = json.loads(path.read_text())
        self.meta = index["meta"]
        if self.meta.get("version") != VERSION:
            raise ValueError(f"offline KV cache {cache_dir}: version {self.meta.get('version')}, expected {VERSION}")
        self.rows = {int(r): s for r, s in index["rows"].items()}
        self._files = {}

    @property
    def layers(self) -> list[int]:
        return list(self.meta["layers"])

    @property
    def compressed(self) -> bool:
        return bool(self.meta.get("kv_slots"))

    def _file(self, shard: int):
        if shard not in self._files:
            self._files[shard] = safe_open(str(self.dir / f"shard-{shard:05d}.safetensors"), framework="pt")
        return self._files[shard]

    def _get(self, row: int, key: str) -> torch.Tensor | None:
        f = self._file(self.rows[row])
        name = f"{row}.{key}"
        return f.get_tensor(name) if name in f.keys() else None

    def check(self, layers, need_importance: bool = False, need_stats: bool = False) -> None:
        missing = sorted(set(layers) - set(self.layers))
        if missing:
            raise ValueError(f"offline KV cache {self.dir} holds teacher layers {self.layers}, but this run pairs "
                             f"teacher layers {missing} too: rebuild it with the same --model_name/--kv_layers")
        if need_importance and not self.meta.get("importance"):
            raise ValueError(f"offline KV cache {self.dir} has no teacher importance (--use_teacher_attention)")
        if need_stats and not self.meta.get("stats"):
            raise ValueError(f"offline KV cache {self.dir} has no teacher answer NLL/entropy (needed by this "
                             f"--teacher_weighting)")

    def batch(self, row_ids, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers, device) -> dict:
        """Targets for a padded batch, in the format of ``teacher_targets``."""
        B, T = input_ids.shape
        lengths = attention_mask.sum(1).tolist()
        for b, row in enumerate(row_ids):
            row = int(row)
            if row not in self.rows:
                raise KeyError(f"offline KV cache {self.dir} has no row {row} (built from other data or a smaller "
                               f"--subset_size?)")
            ids = self._get(row, "ids")
            n = int(lengths[b])
            if ids.numel() != n or not torch.equal(ids.long(), input_ids[b, :n].cpu()):
                raise ValueError(f"offline KV cache {self.dir}: row {row}'s tokens differ from this batch's "
                                 f"(other data, tokenizer or --max_length than the cache was built with)")
        out: dict = {"kv": None, "rkv": None, "importance": None, "nll": None, "entropy": None}
        dtype = getattr(torch, self.meta["dtype"])
        if self.compressed:
            out["rkv"] = []
            for L in layers:
                parts = [[self._get(int(r), f"{p}{L}") for r in row_ids] for p in ("ck", "cv", "ci", "cm")]
                out["rkv"].append({"k": torch.stack(parts[0]).to(device), "v": torch.stack(parts[1]).to(device),
                                   "index": torch.stack(parts[2]).long().to(device),
                                   "mask": torch.stack(parts[3]).bool().to(device)})
        else:
            out["kv"] = []
            for L in layers:
                pair = []
                for p in ("k", "v"):
                    ts = [self._get(int(r), f"{p}{L}") for r in row_ids]
                    H, d = ts[0].shape[0], ts[0].shape[-1]
                    x = torch.zeros(B, H, T, d, dtype=dtype)
                    for b, t in enumerate(ts):
                        x[b, :, :t.shape[1]] = t
                    pair.append(x.to(device))
                out["kv"].append(tuple(pair))
        if self.meta.get("importance"):
            imp = torch.zeros(B, T)
            for b, r in enumerate(row_ids):
                t = self._get(int(r), "imp")
                imp[b, :t.numel()] = t / T  # attention_token_importance divides by the padded length
            out["importance"] = imp.to(device)
        if self.meta.get("stats"):
            out["nll"] = torch.cat([self._get(int(r), "nll") for r in row_ids]).to(device)
            out["entropy"] = torch.cat([self._get(int(r), "ent") for r in row_ids]).to(device)
        return out
