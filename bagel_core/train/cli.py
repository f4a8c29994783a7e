"""``bagel export``: turn a training checkpoint into an inference-ready BAGEL directory.

    bagel export --checkpoint CHECKPOINT_DIR/step_N --out DIR [--weights ema|model] [--dtype bf16|fp32]
    bagel export --checkpoint UPSTREAM/0001000 --config-from BAGEL-7B-MoT --out DIR

writes DIR in the released layout (llm_config.json, vit_config.json, bagel_config.json, ema.safetensors,
ae.safetensors, tokenizer files), loadable by ``bagel infer --model-path DIR`` and upstream's inference.
The weights file is always named ema.safetensors (the release's name), whichever --weights was exported.
The checkpoint is read in chunks (--chunk-gb of fp32 at a time), so memory stays near the output size.
--config-from takes the configs, ae.safetensors and tokenizer from a model directory: needed for an
upstream checkpoint folder (fp32 model.safetensors / ema.safetensors without configs).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``export`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "export",
        help="export a training checkpoint (DCP step dir or upstream folder) as an inference-ready directory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="complete step directory (checkpoint_dir/step_N with COMPLETE) or, with --config-from, an "
        "upstream checkpoint folder",
    )
    p.add_argument("--out", required=True, help="output directory (must be new or empty, unless --overwrite)")
    p.add_argument(
        "--weights",
        choices=["ema", "model"],
        default="ema",
        help="EMA weights (default; what the release ships) or the raw model weights",
    )
    p.add_argument(
        "--dtype", choices=sorted(_DTYPES), default="bf16", help="dtype of the written weights (default: bf16)"
    )
    p.add_argument(
        "--config-from",
        default=None,
        metavar="MODEL_DIR",
        help="take llm/vit configs, ae.safetensors and tokenizer files from this model directory",
    )
    p.add_argument("--chunk-gb", type=float, default=2.0, help="GiB of checkpoint data read at a time (default: 2)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run_export)
    return p


def run_export(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    import torch
    from safetensors import safe_open

    from bagel_core.config.errors import ConfigError
    from bagel_core.model.checkpoint_io import EMA_WEIGHTS
    from bagel_core.train.export import export_checkpoint

    if args.chunk_gb <= 0:
        raise ConfigError(f"--chunk-gb must be positive, got {args.chunk_gb}")

    def progress(done: int, total: int) -> None:
        if not args.quiet:
            print(f"read {done / 2**30:.2f} / {total / 2**30:.2f} GiB", file=sys.stderr)

    start = time.perf_counter()
    out = export_checkpoint(
        Path(args.checkpoint),
        Path(args.out),
        weights=args.weights,
        dtype=getattr(torch, _DTYPES[args.dtype]),
        chunk_bytes=max(1, int(args.chunk_gb * 2**30)),
        config_from=args.config_from,
        overwrite=args.overwrite,
        progress=progress,
    )
    seconds = time.perf_counter() - start
    with safe_open(str(out / EMA_WEIGHTS), framework="pt") as f:
        keys = len(f.keys())
        meta = f.metadata() or {}
    print(
        f"exported {args.checkpoint} -> {out}  ({meta.get('weights')} weights, step {meta.get('step', '?')}, "
        f"{keys} tensors, {args.dtype}, {seconds:.1f} s)"
    )
    for path in sorted(out.iterdir()):
        if path.is_file():
            print(f"  {path.name:<28} {path.stat().st_size:>16,} bytes")
    return 0
