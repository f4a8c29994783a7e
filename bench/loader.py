"""Packed-loader throughput: upstream's ``PackedDataset`` vs ours, per DataLoader worker, on the example data.

    python bench/loader.py --upstream-src /tmp/upstream_bagel            # upstream baseline (preferred)
    python bench/loader.py --baseline-rev b689b9b                        # or: our loader at a commit
    python bench/loader.py --upstream-src DIR --baseline-rev REV --rounds 3 --workers 1,2 --packs 40

Data and budgets: the built-in example (``bagel data download --source builtin``'s generator, written once
under ``--dir``) with the dataset groups of upstream's ``example.yaml`` (``default_dataset_config``) and the
seed guides' fine-tune budgets (expected 10240, max 11520, per sample 10240 tokens; prefer_buffer_before
16384, max_buffer_size 50), CFG dropout text 0.1 / ViT 0.3 / VAE 0.3 (the trainer's ``visual_gen``
defaults), flex layout (no dense masks: upstream ``use_flex=True``, ours ``flex_padding=True``).

Configurations, each in its own Python process (upstream's modules set Pillow globals on import):

* ``upstream``: upstream's ``data/dataset_base.py`` ``PackedDataset`` run unchanged from ``--upstream-src``
  (a folder holding upstream's ``data/`` package, e.g. ``git archive HEAD data`` of the upstream repository),
  with upstream's ``collate_wrapper`` and its ``DATASET_INFO`` filled from our registry. torchvision, cv2 and
  decord are replaced by the documented stand-ins of ``bench/upstream_standin.py``; upstream also needs
  pandas (``pip install pandas``, or ``pip install --target DIR pandas`` and ``--upstream-deps DIR``).
  The tokenizer is ours (the bundled Qwen2.5), called the way upstream calls it (``tokenizer.encode``).
* ``baseline@REV``: our ``PackedDataset`` from ``git archive REV bagel_core`` (``--baseline-rev``).
* ``ours/upstream``, ``ours/carry``: the working tree's ``PackedDataset`` with ``--packing upstream`` / the
  default ``carry``, as the trainer runs it: images leave the worker as bytes (``pixels_as_bytes``) and the
  main process normalises them (``normalise_pixels``, inside the timed loop: on CPU that is what a CPU
  trainer pays; a GPU trainer does it on the device after a 4x smaller copy). Its cost is also reported alone
  (``main ms/pack``).
* ``ours/carry+float32``: the same with the images normalised in the worker and handed over as float32 (the
  loader's output before issue #13's byte handoff).

Each runs a ``DataLoader`` with 1 and 2 workers (``--workers``), skips ``--warmup`` packs per worker (start-up,
the first row groups), then takes ``--packs`` packs. Reported: packs/s and tokens/s (wall clock, real tokens
= ``sequence_length``, flex padding not counted), tokens/s per worker, and tokens per worker CPU-second (each
worker's ``time.process_time`` between its packs: what a pack costs, nearly independent of other load on the
machine), each as the median over ``--rounds`` (configurations alternate within a round). Ratios are ours
over the baseline at the same worker count. Figures are for comparison within one run; never assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = {"expected_num_tokens": 10_240, "max_num_tokens": 11_520, "max_num_tokens_per_sample": 10_240}
BUFFER = {"prefer_buffer_before": 16_384, "max_buffer_size": 50}
DROPOUT = {"text": 0.1, "vit": 0.3, "vae": 0.3}
SEED = 42


# ---- inside a child process -----------------------------------------------------------------------------
class _Timed:
    """Wraps a dataset so every pack leaves its worker with ``(pack, worker id, worker CPU seconds)``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __iter__(self):
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        worker = info.id if info is not None else 0
        for pack in self.inner:
            yield pack, worker, time.process_time()


def _timed_dataset(inner: Any) -> Any:
    from torch.utils.data import IterableDataset

    return type("TimedPacks", (_Timed, IterableDataset), {})(inner)


def _upstream_collate(batch: list) -> tuple[Any, int, float]:
    from data.dataset_base import SimpleCustomBatch  # upstream's, from --upstream-src

    pack, worker, cpu = batch[0]
    return SimpleCustomBatch([pack]), worker, cpu


def _ours_collate(item: tuple) -> tuple:
    return item


def _upstream_loader(spec: dict[str, Any]) -> tuple[Any, Any]:
    import yaml

    for extra in (spec["upstream_deps"], spec["upstream_src"]):
        if extra:
            sys.path.insert(0, extra)
    sys.path.insert(0, str(ROOT / "bench"))
    from torch.utils.data import DataLoader

    from bagel_core.data.tokenizer import load_tokenizer
    from bagel_core.sequence.tokens import DEFAULT_MAX_LATENT_SIZE

    # transformers probes for torchvision when imported: load the tokenizer before the stand-ins exist
    tokenizer, new_ids = load_tokenizer()
    import upstream_standin

    upstream_standin.install()
    import data.dataset_base as base  # upstream's module
    import data.dataset_info as info

    info.DATASET_INFO.clear()
    info.DATASET_INFO.update(yaml.safe_load(Path(spec["registry"]).read_text()))
    groups = yaml.safe_load(Path(spec["groups"]).read_text())
    config = base.DataConfig(
        grouped_datasets=groups,
        text_cond_dropout_prob=DROPOUT["text"],
        vit_cond_dropout_prob=DROPOUT["vit"],
        vae_cond_dropout_prob=DROPOUT["vae"],
        max_latent_size=DEFAULT_MAX_LATENT_SIZE,
    )
    dataset = base.PackedDataset(
        config,
        tokenizer=tokenizer,
        special_tokens=new_ids.as_dict(),
        local_rank=0,
        world_size=1,
        num_workers=spec["workers"],
        **BUDGETS,
        **BUFFER,
        use_flex=True,
    )
    dataset.set_epoch(SEED)
    loader = DataLoader(
        _timed_dataset(dataset), batch_size=1, num_workers=spec["workers"], collate_fn=_upstream_collate
    )
    return loader, lambda pack: int(pack.sequence_length), _no_main_work


def _ours_loader(spec: dict[str, Any]) -> tuple[Any, Any]:
    if spec["tree"]:
        sys.path.insert(0, spec["tree"])
    from torch.utils.data import DataLoader

    import bagel_core
    from bagel_core.config.dataset_config import load_dataset_config
    from bagel_core.config.registry import Registry
    from bagel_core.loader.packed_dataset import PackedDataset
    from bagel_core.plan.manifest import build_manifest, write_manifest
    from bagel_core.plan.packing import CfgDropout, PackingParams

    if spec["tree"] and not bagel_core.__file__.startswith(spec["tree"]):
        raise RuntimeError(f"bagel_core imported from {bagel_core.__file__}, not from {spec['tree']}")
    config, registry = load_dataset_config(spec["groups"]), Registry.load(spec["registry"])
    manifest = Path(spec["work"]) / f"manifest-{spec['label'].replace('/', '-')}-{spec['workers']}"
    write_manifest(build_manifest(config, registry, 1, spec["workers"], seed=SEED), manifest)
    as_bytes = {"pixels_as_bytes": True} if spec.get("bytes") else {}  # older trees (--baseline-rev) lack it
    dataset = PackedDataset(
        config,
        registry,
        manifest,
        num_workers=spec["workers"],
        params=PackingParams(**BUDGETS, **BUFFER, mode=spec["mode"]),
        dropout=CfgDropout(**DROPOUT),
        seed=SEED,
        flex_padding=True,
        **as_bytes,
    )
    loader = DataLoader(_timed_dataset(dataset), batch_size=None, num_workers=spec["workers"], collate_fn=_ours_collate)
    if as_bytes:
        from bagel_core.loader.packed_dataset import normalise_pixels

        return loader, lambda pack: int(pack["sequence_length"]), normalise_pixels
    return loader, lambda pack: int(pack["sequence_length"]), _no_main_work


def _no_main_work(pack: Any) -> Any:
    return pack


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Build one configuration's loader, skip the warm-up packs, time ``packs`` packs."""
    import contextlib
    import io
    import warnings

    warnings.filterwarnings("ignore", message="This DataLoader will create")
    quiet = io.StringIO()  # upstream prints a line per pack and skip; keep the report readable
    with contextlib.redirect_stdout(quiet):
        loader, tokens_of, main_work = (_upstream_loader if spec["impl"] == "upstream" else _ours_loader)(spec)
        workers = max(spec["workers"], 1)
        warmup = spec["warmup"] * workers
        per_worker: dict[int, list[tuple[float, int]]] = {}
        tokens = started = 0
        taken, main_s = 0, 0.0
        for index, (pack, worker, cpu) in enumerate(loader):
            if index == warmup:
                started = time.perf_counter()
            tick = time.perf_counter()
            main_work(pack)  # what the consumer must still do before the model can use the pack
            main_s += time.perf_counter() - tick if index >= warmup else 0.0
            if index >= warmup:
                n = tokens_of(pack)
                tokens += n
                taken += 1
                per_worker.setdefault(worker, []).append((cpu, n))
            if taken == spec["packs"]:
                break
        wall = time.perf_counter() - started
    # CPU cost: per worker, the CPU seconds between its first and last timed pack buy the packs after the first
    cpu_seconds = sum(marks[-1][0] - marks[0][0] for marks in per_worker.values())
    cpu_tokens = sum(n for marks in per_worker.values() for _, n in marks[1:])
    return {
        "packs": taken,
        "tokens": tokens,
        "wall_s": wall,
        "packs_per_s": taken / wall,
        "tokens_per_s": tokens / wall,
        "tokens_per_s_per_worker": tokens / wall / workers,
        "tokens_per_cpu_s": cpu_tokens / cpu_seconds if cpu_seconds > 0 else float("nan"),
        "tokens_per_pack": tokens / max(taken, 1),
        "main_ms_per_pack": 1e3 * main_s / max(taken, 1),
    }


# ---- the driver -----------------------------------------------------------------------------------------
def prepare_example(root: Path) -> tuple[Path, Path]:
    """The built-in example written once under ``root``: (registry YAML, dataset-group YAML)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from train import prepare_example as prepare  # the same example bench/train.py trains on

    return prepare(root, t2i_files=10)


def baseline_tree(rev: str, work: Path) -> Path:
    """``bagel_core`` as of ``rev`` (``git archive``) in a folder of its own."""
    tree = work / f"baseline-{rev.replace('/', '_')}"
    if not (tree / "bagel_core").is_dir():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", rev, "bagel_core"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def launch(spec: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-4:])
        return {"error": tail}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upstream-src", default=None, help="folder holding upstream's data/ package")
    p.add_argument("--upstream-deps", default=None, help="extra sys.path entry for upstream-only deps (pandas)")
    p.add_argument("--baseline-rev", default=None, help="also (or instead) run our loader as of this git revision")
    p.add_argument("--workers", default="1,2", help="comma list of DataLoader worker counts")
    p.add_argument("--packs", type=int, default=40, help="timed packs per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed leading packs per worker")
    p.add_argument("--rounds", type=int, default=1, help="repeat every configuration; medians are reported")
    p.add_argument("--only", default=None, help="comma list of labels to run (upstream, baseline, ours/upstream, ...)")
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one); the example is kept there")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return
    if not args.upstream_src and not args.baseline_rev:
        p.error("give --upstream-src (upstream's code) and/or --baseline-rev (our loader at a commit) as baseline")
    work = Path(args.dir or tempfile.mkdtemp(prefix="bagel-bench-loader-"))
    registry, groups = prepare_example(work / "example")
    common = {"registry": str(registry), "groups": str(groups), "work": str(work), "packs": args.packs}
    common.update(warmup=args.warmup, upstream_src=args.upstream_src, upstream_deps=args.upstream_deps)
    configs: list[dict[str, Any]] = []
    if args.upstream_src:
        configs.append({"label": "upstream", "impl": "upstream", "mode": None, "tree": None})
    if args.baseline_rev:
        tree = str(baseline_tree(args.baseline_rev, work))
        for mode in ("upstream", "carry"):
            label = f"baseline@{args.baseline_rev}/{mode}"
            configs.append({"label": label, "impl": "ours", "mode": mode, "tree": tree})
    for mode in ("upstream", "carry"):
        configs.append({"label": f"ours/{mode}", "impl": "ours", "mode": mode, "tree": None, "bytes": True})
    configs.append({"label": "ours/carry+float32", "impl": "ours", "mode": "carry", "tree": None, "bytes": False})
    if args.only:
        wanted = args.only.split(",")
        configs = [c for c in configs if any(c["label"].startswith(w) for w in wanted)]
    worker_counts = [int(w) for w in args.workers.split(",")]
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    print(f"data: {work / 'example'}  budgets {BUDGETS}  packs {args.packs} after {args.warmup} per worker")
    print(f"cpus available: {len(os.sched_getaffinity(0))} (shared: figures move with other load)", flush=True)
    for round_index in range(args.rounds):
        order = configs if round_index % 2 == 0 else configs[::-1]
        for workers in worker_counts:
            for config in order:
                r = launch({**common, **config, "workers": workers})
                results.setdefault((config["label"], workers), []).append(r)
                status = r.get("error") or f"{r['tokens_per_s']:.0f} tokens/s, {r['tokens_per_cpu_s']:.0f} tokens/cpu-s"
                print(f"  round {round_index + 1} {config['label']:<28} workers={workers}: {status}", flush=True)
    report(configs, worker_counts, results)


def _median(runs: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in runs if "error" not in r]
    return statistics.median(values) if values else float("nan")


def report(configs: list[dict[str, Any]], worker_counts: list[int], results: dict) -> None:
    base_label = "upstream" if any(c["label"] == "upstream" for c in configs) else None
    if base_label is None:
        base_label = next((c["label"] for c in configs if c["label"].startswith("baseline@")), configs[0]["label"])
    print(f"\nmedians; ratios are over {base_label} at the same worker count")
    header = (
        f"{'loader':<28} {'workers':>7} {'packs/s':>8} {'tokens/s':>9} {'tok/s/worker':>12} {'ratio':>6} "
        f"{'tok/cpu-s':>9} {'ratio':>6} {'tok/pack':>8} {'main ms/pack':>12}"
    )
    print(header)
    for workers in worker_counts:
        base = results.get((base_label, workers), [])
        base_wall, base_cpu = _median(base, "tokens_per_s_per_worker"), _median(base, "tokens_per_cpu_s")
        for config in configs:
            runs = results.get((config["label"], workers), [])
            if not runs or all("error" in r for r in runs):
                print(f"{config['label']:<28} {workers:>7} failed: {runs[0].get('error') if runs else 'not run'}")
                continue
            per_worker, per_cpu = _median(runs, "tokens_per_s_per_worker"), _median(runs, "tokens_per_cpu_s")
            print(
                f"{config['label']:<28} {workers:>7} {_median(runs, 'packs_per_s'):>8.2f} "
                f"{_median(runs, 'tokens_per_s'):>9.0f} {per_worker:>12.0f} {per_worker / base_wall:>6.2f} "
                f"{per_cpu:>9.0f} {per_cpu / base_cpu:>6.2f} {_median(runs, 'tokens_per_pack'):>8.0f} "
                f"{_median(runs, 'main_ms_per_pack'):>12.1f}"
            )


if __name__ == "__main__":
    main()
