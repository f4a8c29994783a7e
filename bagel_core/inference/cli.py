"""``bagel infer``: text-to-image, editing or understanding with a BAGEL model directory.

bagel infer --model-path DIR --prompt TEXT --out FILE.png          text-to-image
bagel infer --model-path DIR --image IN.png --prompt TEXT --out F  editing
bagel infer --model-path DIR --image IN.png --question TEXT        understanding (prints text)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``infer`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "infer",
        help="generate / edit an image or answer a question with a BAGEL model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model-path",
        required=True,
        help="BAGEL directory (llm_config.json, vit_config.json, ema.safetensors, ae.safetensors, tokenizer files)",
    )
    p.add_argument("--prompt", help="text-to-image prompt, or the edit instruction with --image")
    p.add_argument("--image", help="input image for editing (with --prompt) or understanding (with --question)")
    p.add_argument("--question", help="question about --image; prints the answer")
    p.add_argument("--out", help="output PNG for generation/editing")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50, help="num_timesteps (steps - 1 model evaluations)")
    p.add_argument("--timestep-shift", type=float, default=3.0)
    p.add_argument("--cfg-text-scale", type=float, default=4.0)
    p.add_argument("--cfg-img-scale", type=float, default=None, help="default 1.0 (T2I) / 2.0 (edit)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--think", action="store_true", help="think mode (plan/reason before answering)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.set_defaults(func=run_infer)
    return p


def run_infer(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from bagel_core.config.errors import ConfigError
    from bagel_core.inference import Inferencer, setup_models

    if args.question and not args.image:
        raise ConfigError("--question needs --image (understanding answers a question about an image)")
    if not args.question and not args.prompt:
        raise ConfigError("give --prompt (text-to-image / edit) or --image with --question (understanding)")
    if not args.question and not args.out:
        raise ConfigError("--out FILE.png is required for text-to-image and editing")
    model, vae, tokenizer, ids = setup_models(args.model_path, device=args.device, dtype=getattr(torch, args.dtype))
    inf = Inferencer(model, vae, tokenizer, ids)
    image = None
    if args.image:
        with Image.open(args.image) as opened:
            opened.load()
            image = opened.copy()
    if args.question:
        print(inf.understand(image, args.question, max_new_tokens=args.max_new_tokens, think=args.think))
        return 0
    common = {
        "cfg_text_scale": args.cfg_text_scale,
        "timestep_shift": args.timestep_shift,
        "num_timesteps": args.steps,
        "seed": args.seed,
        "think": args.think,
    }
    if image is not None:
        result = inf.edit(image, args.prompt, cfg_img_scale=args.cfg_img_scale or 2.0, **common)
    else:
        result = inf.generate(
            args.prompt,
            height=args.height,
            width=args.width,
            cfg_img_scale=args.cfg_img_scale or 1.0,
            **common,
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.save(out)
    print(f"wrote {out} ({result.width}x{result.height})", file=sys.stderr)
    return 0
