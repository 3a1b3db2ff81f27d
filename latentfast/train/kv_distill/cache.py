"""``latentfast-kv-cache``: precompute frozen teachers' KV targets once, for ``source: offline:<dir>``.

    latentfast-kv-cache --teachers teachers.yaml --model_name /models/student \\
        --dataset_name train.jsonl --max_length 512 [--kv_compression rkv --kv_slots 24]

For every teacher of ``teachers.yaml`` whose ``source`` is ``offline:<dir>`` (or those named
by ``--teacher``), runs it over the training rows (the rows ``latentfast-kv-distill`` reads
with the same ``--dataset_name``/``--subset_size``/``--seed``) and writes, per row, its KV at
the teacher layers the student's ``--kv_layers`` pair with, its attention importance at
``--importance_layer`` and its answer NLL / entropy, to ``<dir>`` as sharded safetensors
(``latentfast.data.kv_cache``). Only frozen external teachers can be cached (a
self-distillation teacher keeps training).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time
from types import SimpleNamespace

from latentfast.cli import check_path, cli_parser, finite_float, positive_int

from ..checks import check_data_arg
from ..entry import console_entry
from .spec import COMPRESSIONS, TeachersConfigError, load_teachers, teacher_paths_error


def build_parser():
    p = cli_parser(__doc__)
    a = p.add_argument
    a("--teachers", required=True, help="teachers.yaml")
    a("--teacher", action="append", default=None, help="cache this teacher (repeatable; default: every offline one)")
    a("--output_dir", default=None, help="with a single --teacher: write here instead of its offline:<dir>")
    a("--model_name", default="tiny", help="student (local path or 'tiny'): its layer count gives the layer pairs")
    a("--student_layers", type=positive_int, default=None,
      help="the student's layer count, instead of reading --model_name")
    a("--kv_layers", default="all")
    a("--importance_layer", type=int, default=-1)
    a("--dataset_name", default="gsm8k")
    a("--subset_size", type=positive_int, default=None)
    a("--seed", type=int, default=42)
    a("--max_length", type=positive_int, default=512)
    a("--batch_size", type=positive_int, default=16)
    a("--kv_compression", default="none", choices=COMPRESSIONS)
    a("--kv_slots", type=positive_int, default=24)
    a("--kv_lambda", type=finite_float, default=0.1, help="R-KV score: lambda * importance + (1 - lambda) * redundancy")
    a("--cache_dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    a("--shard_size", type=positive_int, default=512, help="rows per safetensors shard")
    a("--device", default=None)
    a("--bf16", action=argparse.BooleanOptionalAction, default=None)
    return p


def _student_config(args):
    from transformers import AutoConfig

    from latentfast.models.local import from_local
    from latentfast.models.tiny import tiny_config

    if args.student_layers is not None:
        return SimpleNamespace(num_hidden_layers=args.student_layers)
    if args.model_name == "tiny":
        return tiny_config(1024)
    return from_local(AutoConfig, args.model_name)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_data_arg(parser, "--dataset_name", args.dataset_name)
    check_path(parser, "--model_name", args.model_name, "model", ("tiny",))
    if not 0.0 <= args.kv_lambda <= 1.0:
        parser.error(f"--kv_lambda: expected a number in [0, 1], got {args.kv_lambda}")
    try:
        cfg = load_teachers(args.teachers)
    except TeachersConfigError as e:
        parser.error(str(e))
    msg = teacher_paths_error(cfg, writing_cache=True)
    if msg:
        parser.error(msg)
    names = args.teacher or [t.name for t in cfg.teachers if t.offline_dir]
    unknown = sorted(set(names) - set(cfg.names))
    if unknown:
        parser.error(f"--teacher {unknown}: not in {args.teachers} (teachers: {cfg.names})")
    if not names:
        parser.error(f"{args.teachers} has no teacher with source offline:<dir>; name one with --teacher")
    if args.output_dir and len(names) != 1:
        parser.error("--output_dir needs exactly one --teacher")
    # the arguments are checked: the teachers' side loads now (--help and argument errors stay light)
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from latentfast.data import build_tokenizer
    from latentfast.data.kv_cache import KVCacheWriter
    from latentfast.data.rows import load_rows
    from latentfast.models.local import from_local
    from latentfast.runtime.device import amp_context

    from .data import encode
    from .teachers import Compression, load_teachers_from_config

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = amp_context(device, args.bf16)
    if args.model_name == "tiny":
        tok = build_tokenizer()
    else:
        tok = from_local(AutoTokenizer, args.model_name)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    rows = load_rows(args.dataset_name, args.subset_size, args.seed)
    compression = Compression(args.kv_slots, args.kv_lambda) if args.kv_compression == "rkv" else None

    written = {}
    for name in names:
        spec = next(t for t in cfg.teachers if t.name == name)
        online = type(cfg)([type(spec)(**{**spec.__dict__, "source": "online"})])
        (teacher,) = load_teachers_from_config(online, _student_config(args), tok, kv_layers=args.kv_layers,
                                               device=device, importance_layer=args.importance_layer,
                                               compression=compression)
        out = args.output_dir or spec.offline_dir
        if not out:
            parser.error(f"teacher {name!r} has source {spec.source!r}: pass --output_dir")
        meta = {"teacher": name, "model": spec.model, "layers": teacher.layers, "pairs": teacher.pairs,
                "importance_layer": teacher.importance_layer, "importance": True, "stats": True,
                "kv_slots": compression.slots if compression else None,
                "kv_lambda": compression.lam if compression else None,
                "dataset_name": args.dataset_name, "subset_size": args.subset_size, "seed": args.seed,
                "max_length": args.max_length, "num_rows": len(rows)}
        writer = KVCacheWriter(out, meta, args.shard_size, getattr(torch, args.cache_dtype))
        t0 = time.time()
        for i in tqdm(range(0, len(rows), args.batch_size), desc=f"kv-cache {name}"):
            ids = list(range(i, min(len(rows), i + args.batch_size)))
            batch = encode(tok, [rows[j] for j in ids], args.max_length, device)
            tgt = teacher.targets(batch, need_importance=True, stats=True, amp=amp)
            writer.add_batch(ids, tgt, batch["input_ids"], batch["attention_mask"])
        writer.close()
        teacher.remove()
        size = sum(f.stat().st_size for f in pathlib.Path(out).glob("shard-*.safetensors"))
        written[name] = {"dir": str(out), "rows": len(rows), "bytes": size, "seconds": time.time() - t0}
        print(f"[kv-cache] {name}: {len(rows)} rows, {size / 2**20:.1f} MiB in {out} "
              f"({time.time() - t0:.0f}s)", flush=True)
    print(json.dumps(written), flush=True)
    return written


cli = console_entry(main)


if __name__ == "__main__":
    cli()
