"""``bagel export``: turn a training checkpoint into an inference-ready BAGEL directory.

    bagel export --checkpoint CHECKPOINT_DIR/step_N --out DIR [--weights ema|model] [--dtype bf16|fp32]
    bagel export --checkpoint UPSTREAM/0001000 --config-from BAGEL-7B-MoT --out DIR
    bagel export --checkpoint CHECKPOINT_DIR/step_N --out DIR --adapter-only     (a LoRA run's adapters alone)

writes DIR in the released layout (llm_config.json, vit_config.json, bagel_config.json, ema.safetensors,
ae.safetensors, tokenizer files), loadable by ``bagel infer --model-path DIR`` and upstream's inference.
The weights file is always named ema.safetensors (the release's name), whichever --weights was exported.
The checkpoint is read in chunks (--chunk-gb of fp32 at a time), so memory stays near the output size.
--config-from takes the configs, ae.safetensors and tokenizer from a model directory: needed for an
upstream checkpoint folder (fp32 model.safetensors / ema.safetensors without configs).
A LoRA run's checkpoint (--lora_rank > 0) exports merged weights (base + alpha / rank * B @ A) under the released
names; --adapter-only writes its adapters alone in peft's format (adapter_model.safetensors, fp32 by default, and
adapter_config.json), which bagel_core.train.lora.apply_adapter or peft.PeftModel.from_pretrained put on the base.
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
        "--dtype",
        choices=sorted(_DTYPES),
        default=None,
        help="dtype of the written weights (default: bf16; fp32 with --adapter-only)",
    )
    p.add_argument(
        "--config-from",
        default=None,
        metavar="MODEL_DIR",
        help="take llm/vit configs, ae.safetensors and tokenizer files from this model directory",
    )
    p.add_argument("--chunk-gb", type=float, default=2.0, help="GiB of checkpoint data read at a time (default: 2)")
    p.add_argument(
        "--adapter-only",
        action="store_true",
        help="LoRA checkpoints: write the adapters alone (adapter_model.safetensors + adapter_config.json, peft's "
        "format) instead of the merged model",
    )
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
    from bagel_core.train.lora import ADAPTER_WEIGHTS

    if args.chunk_gb <= 0:
        raise ConfigError(f"--chunk-gb must be positive, got {args.chunk_gb}")
    adapter_only = getattr(args, "adapter_only", False)
    dtype_name = args.dtype or ("fp32" if adapter_only else "bf16")

    def progress(done: int, total: int) -> None:
        if not args.quiet:
            print(f"read {done / 2**30:.2f} / {total / 2**30:.2f} GiB", file=sys.stderr)

    start = time.perf_counter()
    out = export_checkpoint(
        Path(args.checkpoint),
        Path(args.out),
        weights=args.weights,
        dtype=getattr(torch, _DTYPES[dtype_name]),
        chunk_bytes=max(1, int(args.chunk_gb * 2**30)),
        config_from=args.config_from,
        overwrite=args.overwrite,
        progress=progress,
        adapter_only=adapter_only,
    )
    seconds = time.perf_counter() - start
    with safe_open(str(out / (ADAPTER_WEIGHTS if adapter_only else EMA_WEIGHTS)), framework="pt") as f:
        keys = len(f.keys())
        meta = f.metadata() or {}
    what = f"{meta.get('weights')} adapters" if adapter_only else f"{meta.get('weights')} weights"
    print(
        f"exported {args.checkpoint} -> {out}  ({what}, step {meta.get('step', '?')}, "
        f"{keys} tensors, {dtype_name}, {seconds:.1f} s)"
    )
    for path in sorted(out.iterdir()):
        if path.is_file():
            print(f"  {path.name:<28} {path.stat().st_size:>16,} bytes")
    return 0
