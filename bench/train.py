"""End-to-end training throughput: ``torchrun -m bagel_core.train`` on the built-in example data.

    python bench/train.py                                   # CPU: tiny and small, 1 and 2 processes
    python bench/train.py --presets tiny --nprocs 1 --latent-cache both   # the step with and without the cache
                                                            # (of the images the run reads; --cache-scope all)
    python bench/train.py --device cuda --presets 7b-layers --nprocs 1 \\
        --budgets 10240,11520,10240                          # a GPU: the seed guides' fine-tune budgets

For every (preset, processes) pair it launches a real run (data loading, VAE encode, FSDP2, optimizer,
EMA, logging; checkpoints only at the end) and reads ``metrics.jsonl``: median seconds per step,
global tokens/s, tokens/s per process, MFU (GPU with a known peak) and peak memory per process.
The first ``--skip`` steps (start-up, first DataLoader fill) are left out. Figures are for
comparison within one run on one machine, never assertions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bagel_core.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def prepare_example(root: Path, t2i_files: int, edit_files: int = 10) -> tuple[Path, Path]:
    """The built-in example written once under ``root``: (registry YAML, dataset-group YAML)."""
    from bagel_core.config.discover import default_dataset_config, discover_registry
    from bagel_core.data.example_generator import ExampleConfig, write_example_dataset

    registry_path, groups_path = root / "registry" / "dataset_info.yaml", root / "registry" / "example.yaml"
    if not registry_path.is_file():
        data = write_example_dataset(root / "data", ExampleConfig(t2i_files=t2i_files, edit_files=edit_files))
        registry = discover_registry(data, parquet_info_dir=root / "registry" / "parquet_info")
        registry.source = registry_path
        registry.save(registry_path)
        default_dataset_config(registry).save(groups_path)
    return registry_path, groups_path


def latent_cache(
    preset: str, registry: Path, groups: Path, root: Path, workers: int, training: tuple[list[str], int] | None
) -> tuple[Path, float]:
    """Index the example and encode VAE images once with ``preset``'s VAE (the trainer's default seed): those the
    training ``(argv, world size)`` reads (``planned_reads``), or every one when ``training`` is None. One folder
    per preset, grown as runs need more. Returns it and the seconds the encode took (0 when nothing was new)."""
    from bagel_core.config.dataset_config import load_dataset_config
    from bagel_core.config.registry import Registry
    from bagel_core.index.indexer import index_registry
    from bagel_core.loader.latent_cache import build_latent_cache
    from bagel_core.train.latents import planned_reads, training_vae

    index = root / "index"
    if not (index / "index.parquet").is_file():
        index_registry(Registry.load(registry), index)
    only = planned_reads(*training).samples if training is not None else None
    vae = training_vae("", preset, 4396)
    folder = root / f"latents-{preset}"
    result = build_latent_cache(vae, load_dataset_config(groups), index, folder, workers=workers, only=only)
    print(f"  {result.summary()}", flush=True)
    return folder, result.seconds if result.shards_written else 0.0


def train_argv(preset: str, args: argparse.Namespace, registry: Path, groups: Path, out: Path) -> list[str]:
    """The trainer arguments of one benchmark run."""
    expected, maximum, per_sample = args.budgets
    argv = [
        "--dataset_info", registry, "--dataset_config_file", groups, "--model_preset", preset,
        "--num_workers", args.num_workers, "--total_steps", args.steps, "--log_every", 1,
        "--save_every", 10**9, "--checkpoint_dir", out / "ckpt", "--results_dir", out / "results",
        "--expected_num_tokens", expected, "--max_num_tokens", maximum, "--max_num_tokens_per_sample", per_sample,
        "--sharding_strategy", "FULL_SHARD", "--warmup_steps", 0, "--max_latent_size", 64,
    ]  # fmt: skip
    if args.device == "cuda":
        argv += ["--attn_backend", args.attn_backend]
    return [str(a) for a in argv]


def run_one(
    preset: str, nproc: int, args: argparse.Namespace, registry: Path, groups: Path, out: Path, cache: Path | None
) -> dict:
    argv = train_argv(preset, args, registry, groups, out)
    if cache is not None:
        argv += ["--latent_cache", str(cache)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command += ["-m", "bagel_core.train", *map(str, argv)]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)), WANDB_MODE="disabled")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)}
    records = [rec for _, rec in sorted(read_metrics(out / "results").items())]
    steady = [r for r in records if r["step"] > args.skip] or records
    sec = statistics.median(1.0 / r["steps_per_sec"] for r in steady)
    tokens = statistics.median(r["tokens_per_sec"] for r in steady)
    mfu = [r["mfu"] for r in steady if r.get("mfu")]
    return {
        "sec_per_step": sec,
        "tokens_per_s": tokens,
        "tokens_per_s_per_proc": tokens / nproc,
        "mfu": statistics.median(mfu) if mfu else None,
        "peak_mem_mib": max(r.get("peak_mem_mib") or 0 for r in records),
        "tokens_per_step": statistics.median(r["tokens_per_step"] for r in steady),
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,small", help="comma list: tiny, small, 7b-layers, 7b-mot")
    p.add_argument("--nprocs", default="1,2", help="comma list of processes per run")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--attn-backend", default="flex", help="GPU only: sdpa, flex or flash")
    p.add_argument("--budgets", default="4096,6144,6000", help="expected,max,max_per_sample tokens per pack")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--skip", type=int, default=2, help="leading steps left out of the medians")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--t2i-files", type=int, default=10)
    p.add_argument("--edit-files", type=int, default=10)
    p.add_argument(
        "--latent-cache",
        default="both",
        choices=["off", "on", "both"],
        help="VAE images encoded in every step (off), read from a cache built first with `bagel data latents`'s "
        "code (on), or both side by side",
    )
    p.add_argument(
        "--cache-scope",
        default="planned",
        choices=["planned", "all"],
        help="cache the VAE images each run reads (planned, as the vae_latents asset does) or every one (all)",
    )
    p.add_argument("--cache-workers", type=int, default=2, help="processes encoding the cache")
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    args = p.parse_args(argv)
    args.budgets = [int(x) for x in args.budgets.split(",")]
    work = Path(args.dir or tempfile.mkdtemp(prefix="bagel-bench-train-"))
    registry, groups = prepare_example(work / "example", args.t2i_files, args.edit_files)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.latent_cache]
    print(f"device={args.device} budgets={args.budgets} steps={args.steps} (median over steps > {args.skip})")
    header = (
        f"{'preset':<10} {'procs':>5} {'latents':>8} {'s/step':>8} {'tokens/s':>10} {'tok/s/proc':>10} {'MFU':>6} "
        f"{'peak MiB':>9}"
    )
    print(header)
    for preset in args.presets.split(","):
        for nproc in (int(n) for n in args.nprocs.split(",")):
            cache = None
            if True in modes:
                planned = args.cache_scope == "planned"
                training = (train_argv(preset, args, registry, groups, work / "plan"), nproc) if planned else None
                cache, seconds = latent_cache(preset, registry, groups, work / "example", args.cache_workers, training)
                if seconds:
                    print(f"  (latent cache of {preset!r} encoded once in {seconds:.1f}s)")
            for cached in modes:
                label = "cache" if cached else "live"
                out = work / f"{preset}-{nproc}-{label}"
                r = run_one(preset, nproc, args, registry, groups, out, cache if cached else None)
                if "error" in r:
                    print(f"{preset:<10} {nproc:>5} {label:>8} failed: {r['error']}")
                    continue
                mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
                print(
                    f"{preset:<10} {nproc:>5} {label:>8} {r['sec_per_step']:>8.3f} {r['tokens_per_s']:>10.0f} "
                    f"{r['tokens_per_s_per_proc']:>10.0f} {mfu:>6} {r['peak_mem_mib']:>9.0f}"
                )


if __name__ == "__main__":
    main()
