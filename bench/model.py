"""Forward+backward throughput of the BAGEL model on a synthetic packed batch.

    python bench/model.py                               # CPU: tiny and small presets, sdpa
    python bench/model.py --presets 7b-layers --backends sdpa,flex,flash --device cuda

Prints real tokens/s per (preset, backend) and, on a GPU with a known peak, MFU computed as in
training.md 10 (LLM only: 6·dense_N·T + 12·hd·nh·L·S). ``7b-layers`` is the released 7B
configuration with only ``--layers`` decoder layers (and two ViT layers), so one GPU can hold it
while the per-layer shapes are the real ones. Nothing here is a test; figures are for comparison
between runs on the same machine.
"""

from __future__ import annotations

import argparse
import time

import torch

from bagel_core.model import build_model, preset
from bagel_core.model.config import BagelConfig
from bagel_core.model.synthetic import make_packed_batch, mixed_samples
from bagel_core.train.metrics import compute_mfu, detect_peak_tflops, llm_flops


def make_config(name: str, layers: int) -> BagelConfig:
    cfg = preset(name)
    if name == "7b-layers":
        cfg.llm.num_hidden_layers = layers
    return cfg


def _to(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def bench_one(
    cfg: BagelConfig,
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
    tokens: int,
    image_side: int,
    steps: int,
    warmup: int,
) -> dict:
    torch.manual_seed(0)
    model = build_model(cfg, device=device, attn_backend=backend).to(dtype)
    batch = _to(make_packed_batch(cfg, mixed_samples(tokens, image_side=image_side)), device)
    batch["padded_latent"] = batch["padded_latent"].to(dtype)
    batch["packed_vit_tokens"] = batch["packed_vit_tokens"].to(dtype)
    n_tokens = batch["sequence_length"]
    sq = sum(n * n for n in batch["sample_lens"])

    def step() -> None:
        out = model(**batch)
        loss = out.ce.mean() + out.mse.mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = (time.perf_counter() - start) / steps
    peak = detect_peak_tflops(device)
    tflops, mfu = compute_mfu(llm_flops(cfg.llm, n_tokens, sq), elapsed, peak, 1)
    return {
        "tokens": n_tokens,
        "samples": len(batch["sample_lens"]),
        "sec_per_step": elapsed,
        "tokens_per_s": n_tokens / elapsed,
        "tflops": tflops,
        "mfu": mfu if peak else None,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,small", help="comma list of tiny, small, 7b-layers, 7b-mot")
    p.add_argument("--backends", default=None, help="default: sdpa on CPU; sdpa,flex,flash on GPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per pack (default 1024 CPU, 16384 GPU)")
    p.add_argument("--image-side", type=int, default=None, help="latent/ViT grid side per image")
    p.add_argument("--layers", type=int, default=4, help="decoder layers for 7b-layers")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    backends = (args.backends or ("sdpa,flex,flash" if gpu else "sdpa")).split(",")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    tokens = args.tokens or (16384 if gpu else 1024)
    side = args.image_side or (32 if gpu else 8)
    print(f"device={device} dtype={dtype} tokens/pack~{tokens} image_side={side} threads={torch.get_num_threads()}")
    print(f"{'preset':<10} {'backend':<6} {'tokens':>7} {'s/step':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6}")
    for name in args.presets.split(","):
        cfg = make_config(name, args.layers)
        for backend in backends:
            if backend == "flex" and not gpu:
                print(f"{name:<10} {backend:<6} skipped: FlexAttention has no CPU backward")
                continue
            try:
                r = bench_one(cfg, backend, device, dtype, tokens, side, args.steps, args.warmup)
            except RuntimeError as exc:
                print(f"{name:<10} {backend:<6} failed: {str(exc).splitlines()[0]}")
                continue
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            print(
                f"{name:<10} {backend:<6} {r['tokens']:>7} {r['sec_per_step']:>8.3f} {r['tokens_per_s']:>10.0f} "
                f"{r['tflops']:>8.3f} {mfu:>6}"
            )
            if gpu:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
