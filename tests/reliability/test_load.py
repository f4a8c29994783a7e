"""Load: the built-in example at 1x and scaled 20x is registered, indexed, counted, planned and trained from. The
indexer's and the loader's peak RSS are measured in fresh processes at both scales and must stay within a budget of
1x (they stream: memory follows their batch sizes, not the dataset; the budgets below say how close to flat each
one is at this size); an index re-run on unchanged data re-reads nothing.

The 20x copy is the 1x example's files hard-linked twenty times under new names (shards, VLM images) plus the JSONL's
lines repeated with new ids and image names, as ``bench/index.py`` scales its data: 20x the files, rows, images and
bytes in well under a second, where generating 20x with the example generator costs ~25-30 s of rendering on two cores.
Memory and re-reads depend on counts and sizes, not on the pictures being different.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest
import yaml
from packed_fixtures import SMALL_EDIT_VIT, SMALL_PARAMS, SMALL_VAE, SMALL_VLM_VIT
from train_fixtures import records, train_args

from bagel_core.cli import main as bagel
from bagel_core.config.discover import default_dataset_config, discover_registry
from bagel_core.data.example_generator import write_example_dataset

ROOT = Path(__file__).resolve().parents[2]
SCALE = 20
PACKS = 40  # packs the loader yields at each scale: ~140 samples, about half an epoch of the 1x example

# Peak RSS of one bagel command run in-process in a fresh interpreter (VmHWM: this process only; the indexer runs
# here with --workers 1, so no pool processes), and the bytes it read through read(2) while running (rchar).
_CLI_CHILD = """
import json, sys, time
def status(key):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key + ":")) / 1024
def rchar():
    with open("/proc/self/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("rchar:"))
import bagel_core.index.indexer  # imported before counting: rchar then counts the run's reads, not module files
from bagel_core.cli import main
before, started = rchar(), time.perf_counter()
rc = main(sys.argv[2:])
seconds, read = time.perf_counter() - started, rchar() - before
json.dump({"rc": rc, "peak_mb": status("VmHWM"), "seconds": seconds, "read_bytes": read}, open(sys.argv[1], "w"))
"""

# The loader: a PackedDataset over the plan (built in the main process, as the trainer does), then PACKS packs.
# Two peaks: the whole process (tokenizer and manifest included) and iteration alone (VmHWM reset after building
# the dataset by writing 5 to /proc/self/clear_refs), where reading, decoding and packing samples shows.
_LOADER_CHILD = """
import itertools, json, sys, time
def status(key):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key + ":")) / 1024
out, registry, groups, manifest, packs, budgets = sys.argv[1:7]
from bagel_core.config.dataset_config import load_dataset_config
from bagel_core.config.registry import Registry
from bagel_core.loader.packed_dataset import PackedDataset
from bagel_core.plan.packing import PackingParams
ds = PackedDataset(load_dataset_config(groups), Registry.load(registry), manifest,
                   params=PackingParams(*map(int, budgets.split(","))))
built = status("VmHWM")
try:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
except OSError:  # not allowed here: the iteration peak is then the whole process's
    pass
started, samples = time.perf_counter(), 0
for batch in itertools.islice(iter(ds), int(packs)):
    samples += len(batch["sample_lens"])
json.dump({"peak_mb": max(built, status("VmHWM")), "iter_peak_mb": status("VmHWM"), "samples": samples,
           "seconds": time.perf_counter() - started}, open(out, "w"))
"""


@dataclass
class Scaled:
    """One scale of the example: its registry, small-transform groups YAML and where its outputs go."""

    scale: int
    root: Path
    registry: Path
    groups: Path

    @property
    def index(self) -> Path:
        return self.root / "index"

    @property
    def plan(self) -> Path:
        return self.root / "plan"


def _scale_example(src: Path, dst: Path, times: int) -> None:
    """``src`` (a ``bagel_example`` folder) copied ``times`` times over into ``dst`` as hard links under new names;
    the JSONL gets each line ``times`` times with new ids pointing at the linked images."""
    for shard in sorted(src.rglob("*.parquet")):
        folder = dst / shard.parent.relative_to(src)
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(times):
            os.link(shard, folder / f"{shard.stem}_x{k}.parquet")
    for info in sorted((src / "editing" / "parquet_info").glob("*.json")):  # the sizes of every linked shard
        entries = json.loads(info.read_text())
        out = dst / "editing" / "parquet_info" / info.name
        out.parent.mkdir(parents=True, exist_ok=True)
        scaled = {f"{Path(key).parent}/{Path(key).stem}_x{k}.parquet": v for key, v in entries.items()
                  for k in range(times)}  # fmt: skip
        out.write_text(json.dumps(scaled, indent=2))
    images = dst / "vlm" / "images"
    images.mkdir(parents=True)
    for image in sorted((src / "vlm" / "images").iterdir()):
        for k in range(times):
            os.link(image, images / f"x{k}_{image.name}")
    for jsonl in sorted((src / "vlm").glob("*.jsonl")):
        lines = []
        for k in range(times):
            for line in jsonl.read_text().splitlines():
                record = json.loads(line)
                record["id"] = f"{record['id']}_x{k}"
                image = record.get("image")  # a string, a list, or absent (a text-only conversation)
                if image is not None:
                    record["image"] = [f"x{k}_{i}" for i in image] if isinstance(image, list) else f"x{k}_{image}"
                lines.append(json.dumps(record))
        (dst / "vlm" / jsonl.name).write_text("\n".join(lines) + "\n")


def _register(example: Path, root: Path, scale: int) -> Scaled:
    """Registry and groups YAML as ``bagel data registry`` writes them, with the small transforms of the packed
    fixtures (a sample costs tens of tokens: CPU-cheap packs, the same code paths)."""
    registry_path, groups_path = root / "registry" / "dataset_info.yaml", root / "registry" / "example.yaml"
    registry = discover_registry(example, parquet_info_dir=root / "registry" / "parquet_info")
    registry.source = registry_path
    registry_path.parent.mkdir(parents=True, exist_ok=True)
    registry.save(registry_path)
    default_dataset_config(registry).save(groups_path)
    groups = yaml.safe_load(groups_path.read_text())
    groups["t2i_pretrain"]["image_transform_args"] = dict(SMALL_VAE)
    groups["unified_edit"]["image_transform_args"] = dict(SMALL_VAE)
    groups["unified_edit"]["vit_image_transform_args"] = dict(SMALL_EDIT_VIT)
    groups["vlm_sft"]["image_transform_args"] = dict(SMALL_VLM_VIT)
    groups_path.write_text(yaml.safe_dump(groups, sort_keys=False))
    return Scaled(scale, root, registry_path, groups_path)


def _start_child(code: str, out: Path, *args: object) -> tuple[subprocess.Popen, Path]:
    """A fresh interpreter running ``code`` (which writes its figures as JSON to ``out``)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-c", code, str(out), *map(str, args)]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, out


def _finish_child(child: tuple[subprocess.Popen, Path], timeout: int = 300) -> dict:
    proc, out = child
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out.read_text())


def _run_child(code: str, out: Path, *args: object) -> dict:
    return _finish_child(_start_child(code, out, *args))


def _index(s: Scaled, name: str) -> dict:
    """``bagel data index`` (one worker: the same on every machine) in a fresh process."""
    argv = ["data", "index", "--registry", s.registry, "--out", s.index, "--workers", 1, "--no-progress"]
    result = _run_child(_CLI_CHILD, s.root / f"{name}.json", *argv)
    assert result["rc"] == 0
    return result


def _reread(s: Scaled) -> int:
    """Files the last index run re-read (``files.parquet``: ``reused`` is false for a file read in that run)."""
    return pl.read_parquet(s.index / "files.parquet").filter(~pl.col("reused")).height


BUDGETS = (
    SMALL_PARAMS.expected_num_tokens,
    SMALL_PARAMS.max_num_tokens,
    SMALL_PARAMS.max_num_tokens_per_sample,
    SMALL_PARAMS.prefer_buffer_before,
    SMALL_PARAMS.max_buffer_size,
)


def _plan(s: Scaled, simulate: bool = True) -> None:
    """``bagel data stats`` then ``bagel data plan`` (one process, no DataLoader workers), in-process; without
    ``simulate`` the manifest alone (what the loader reads; no token statistics needed)."""
    common = ["--registry", s.registry, "--dataset-config", s.groups, "--index", s.index]
    if simulate:
        assert bagel(["data", "stats", *map(str, common), "--out", str(s.root / "stats")]) == 0
    budgets = dict(zip(("--expected-num-tokens", "--max-num-tokens", "--max-num-tokens-per-sample",
                        "--prefer-buffer-before", "--max-buffer-size"), BUDGETS))  # fmt: skip
    argv = [*common, "--out", s.plan, "--stats", s.root / "stats", "--world-size", 1, "--num-workers", 0,
            *(x for kv in budgets.items() for x in kv), *([] if simulate else ["--no-simulation"])]  # fmt: skip
    assert bagel(["data", "plan", *map(str, argv)]) == 0


@pytest.fixture(scope="module")
def scales(tmp_path_factory) -> dict[int, Scaled]:
    """The example written once at 1x, linked up to 20x; each registered with small transforms."""
    base = tmp_path_factory.mktemp("load")
    example = write_example_dataset(base / "x1" / "data")
    big = base / f"x{SCALE}" / "data" / "bagel_example"
    _scale_example(example, big, SCALE)
    return {1: _register(example, base / "x1", 1), SCALE: _register(big, base / f"x{SCALE}", SCALE)}


def _indexer_flat(small: float, big: float) -> bool:
    """The indexer's budget at 20x: 25 % + 16 MB over 1x. Measured on two cores: 1x ~146 MB, 20x 170-183 MB, so
    not quite flat: at this size each scan query, index batch and writer buffer still grows with the data up to
    its fixed cap (``scan.QUERY_ROWS``, ``KEEP_ROWS``, 16,384-row writer batches), and Arrow's allocator keeps its
    high-water mark. A regression that holds decoded samples (~6,000 images of up to 512x512 RGB: ~1.5 GB) or
    decodes whole files at once blows this by far; one that keeps only the raw bytes of every sample (~20 MB at
    20x) would not be told apart from that growth at this size."""
    return big <= small * 1.25 + 16


def _loader_flat(small: float, big: float) -> bool:
    """The loader's budget: 16 MB over 1x (measured: +2 MB). It reads the same packs at both scales; only the
    manifest (20x the units) grows, so keeping the raw bytes of the 20x data (~20 MB), reading whole files or the
    whole JSONL per sample, or decoding ahead would exceed it."""
    return big <= small + 16


def test_the_example_at_20x_indexes_and_loads_in_flat_memory_and_a_rerun_rereads_nothing(scales, capsys, fault):
    started = time.perf_counter()
    figures: dict[int, dict] = {}
    for scale, s in scales.items():
        first = _index(s, "index")
        rows = pl.read_parquet(s.index / "index.parquet", columns=["status"])
        assert rows.height == 300 * scale and rows.filter(pl.col("status") != "ok").is_empty()
        assert _reread(s) == pl.read_parquet(s.index / "files.parquet").height  # a fresh index reads every file
        _plan(s, simulate=scale == SCALE)  # planned at 20x with the packing simulation (token statistics first)
        figures[scale] = {"rows": rows.height, "index": first}
    big_data = scales[SCALE]
    again = _index(big_data, "index_again")  # before the loaders start: an index run rewrites the registry
    files = pl.read_parquet(big_data.index / "files.parquet").height
    assert _reread(big_data) == 0  # unchanged files: every one reused from the previous run
    # Both loaders at once (peaks are per process; most of their time is importing torch and the tokenizer).
    loaders = {scale: _start_child(_LOADER_CHILD, s.root / "loader.json", s.registry, s.groups, s.plan, PACKS,
                                   ",".join(map(str, BUDGETS))) for scale, s in scales.items()}  # fmt: skip
    for scale, child in loaders.items():
        figures[scale]["loader"] = _finish_child(child)
        assert figures[scale]["loader"]["samples"] > PACKS
    # ... and the re-run read footers and its own index parts, not the samples: less than half the data's bytes
    # (a re-read of the samples reads every byte of every image and caption at least once).
    data_bytes = sum(p.stat().st_size for p in (big_data.root / "data").rglob("*") if p.is_file())
    assert again["read_bytes"] < data_bytes / 2
    one, big = figures[1], figures[SCALE]
    with capsys.disabled():
        print(f"\nload test, the example at 1x / {SCALE}x (peak RSS, a fresh process each):")
        for scale, f in figures.items():
            print(f"  {scale:>2}x  rows {f['rows']:>6,}  indexer {f['index']['peak_mb']:6.1f} MB "
                  f"({f['index']['seconds']:.2f} s, read {f['index']['read_bytes'] / 1e6:.1f} MB)  loader "
                  f"{f['loader']['peak_mb']:6.1f} MB, iterating {f['loader']['iter_peak_mb']:6.1f} MB ({PACKS} "
                  f"packs, {f['loader']['samples']} samples, {f['loader']['seconds']:.2f} s)")  # fmt: skip
        print(f"  {SCALE}x index re-run: {again['peak_mb']:.1f} MB, {again['seconds']:.2f} s, 0 of {files} files "
              f"re-read, {again['read_bytes'] / 1e6:.1f} MB read ({SCALE}x data: {data_bytes / 1e6:.1f} MB); "
              f"test {time.perf_counter() - started:.1f} s")  # fmt: skip
    assert _indexer_flat(one["index"]["peak_mb"], big["index"]["peak_mb"]), (one["index"], big["index"])
    for what in ("peak_mb", "iter_peak_mb"):
        assert _loader_flat(one["loader"][what], big["loader"][what]), (what, one["loader"], big["loader"])
    ix1, ix20, ld1, ld20 = one["index"], big["index"], one["loader"], big["loader"]
    fault(
        f"load: the example at 1x and {SCALE}x ({one['rows']:,} / {big['rows']:,} rows), indexed, planned, loaded",
        f"peak RSS 1x -> {SCALE}x: indexer {ix1['peak_mb']:.0f} -> {ix20['peak_mb']:.0f} MB ({ix1['seconds']:.1f} / "
        f"{ix20['seconds']:.1f} s; budget +25 % + 16 MB), loader {ld1['peak_mb']:.0f} -> {ld20['peak_mb']:.0f} MB "
        f"({PACKS} packs; budget +16 MB); an index re-run on unchanged data re-reads 0 of {files} files "
        f"({again['read_bytes'] / 1e6:.1f} MB of footers and index parts read, {again['seconds']:.1f} s)",
    )


@pytest.mark.slow
def test_a_training_runs_from_the_20x_plan(scales, tmp_path, fault):
    s = scales[SCALE]
    if not (s.plan / "packing_simulation.json").is_file():  # run alone: index and plan first
        _index(s, "index")
        _plan(s)
    started = time.perf_counter()
    fx = SimpleNamespace(groups=s.groups, registry=s.registry)
    from bagel_core.train.__main__ import cli

    assert cli(train_args(fx, tmp_path, manifest=s.plan, total_steps=2)) == 0
    seconds = time.perf_counter() - started
    config = json.loads((tmp_path / "results" / "config.json").read_text())
    assert config["data"]["manifest"] == str(s.plan)  # trained from the 20x plan, not one planned at start-up
    assert not list((tmp_path / "results").glob("manifest_*"))
    recs = records(tmp_path / "results")
    assert sorted(recs) == [1, 2] and all(r["tokens_per_step"] > 0 for r in recs.values())
    fault(
        f"load: a training from the {SCALE}x example's plan",
        f"2 steps of the tiny preset from the {SCALE}x manifest in {seconds:.0f} s (one process)",
    )
