"""The VAE latent cache: built once, resumable, refused when stale, and the same loss as the live encode."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from packed_fixtures import NO_DROPOUT, make_dataset, make_manifest, small_fixture
from safetensors.torch import load_file
from train_fixtures import records, train_args

from bagel_core.config.dataset_config import load_dataset_config
from bagel_core.config.errors import ConfigError
from bagel_core.loader.latent_cache import (
    MANIFEST,
    SHARDS,
    build_latent_cache,
    open_latent_cache,
    pack_latents,
    plan_shards,
    vae_identity,
    vae_transforms,
)
from bagel_core.train.__main__ import cli
from bagel_core.train.latents import training_vae

SEED = 7  # train_args' global_seed: the random tiny VAE the trainer builds


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return small_fixture(tmp_path_factory.mktemp("latents") / "data")


@pytest.fixture(scope="module")
def vae():
    return training_vae("", "tiny", SEED)


@pytest.fixture(scope="module")
def cache(fx, vae, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "latents"
    result = build_latent_cache(vae, load_dataset_config(fx.groups), fx.index_dir, out)
    assert result.shards_written > 0 and result.images > 0 and not result.rejected
    return out


def _open(folder: Path, vae, groups_yaml: Path):
    transforms = vae_transforms(load_dataset_config(groups_yaml))
    return open_latent_cache(folder, vae_identity(vae), transforms, transforms)


def test_packs_carry_cached_moments_whose_latents_equal_the_live_encode(fx, vae, cache, tmp_path):
    manifest = make_manifest(fx, tmp_path / "manifest")
    latents, note = _open(cache, vae, fx.groups)
    assert latents is not None and "shard(s) used" in note
    # the index's quarantined rows are not cached (they are never trained): pass them over in both
    live = iter(make_dataset(fx, manifest, dropout=NO_DROPOUT, seed=3, quarantine=fx.index_dir))
    cached = iter(make_dataset(fx, manifest, dropout=NO_DROPOUT, seed=3, quarantine=fx.index_dir, latent_cache=latents))
    seen = 0
    for _ in range(6):
        a, b = next(live), next(cached)
        assert torch.equal(a["packed_text_ids"], b["packed_text_ids"])
        if "patchified_vae_latent_shapes" not in a:
            continue
        assert a["patchified_vae_latent_shapes"] == b["patchified_vae_latent_shapes"]
        assert "padded_images" not in b and all(b["vae_from_cache"])  # every fixture image was cached
        shapes = a["patchified_vae_latent_shapes"]
        z_live = pack_latents(vae, shapes, torch.Generator().manual_seed(11), 2, padded_images=a["padded_images"])
        z_cached = pack_latents(
            vae,
            shapes,
            torch.Generator().manual_seed(11),
            2,
            padded_moments=b["padded_moments"],
            from_cache=b["vae_from_cache"],
        )
        torch.testing.assert_close(z_cached, z_live, rtol=0, atol=0)
        seen += len(shapes)
    assert seen > 0


def test_cached_text_to_image_samples_are_never_decoded(fx, vae, cache, tmp_path, monkeypatch):
    """A T2I sample whose image is cached is opened for its size only; the packs are those of the live path."""
    from bagel_core.loader import readers

    decoded: list[str] = []
    real = readers.decode_image

    def spy(data, what):
        decoded.append(what)
        return real(data, what)

    monkeypatch.setattr(readers, "decode_image", spy)
    manifest = make_manifest(fx, tmp_path / "manifest")
    latents, _ = _open(cache, vae, fx.groups)
    kwargs = {"dropout": NO_DROPOUT, "seed": 3, "quarantine": fx.index_dir}
    live = [b for b, _ in zip(make_dataset(fx, manifest, **kwargs), range(6))]
    live_t2i = decoded.count("image")
    decoded.clear()
    cached = [b for b, _ in zip(make_dataset(fx, manifest, latent_cache=latents, **kwargs), range(6))]
    assert live_t2i > 0 and decoded.count("image") == 0, (live_t2i, decoded)
    for a, b in zip(live, cached):
        assert torch.equal(a["packed_text_ids"], b["packed_text_ids"]) and a["sample_lens"] == b["sample_lens"]
        assert a.get("patchified_vae_latent_shapes") == b.get("patchified_vae_latent_shapes")


def test_training_on_the_cache_gives_the_live_losses(fx, cache, tmp_path, capsys):
    assert cli(train_args(fx, tmp_path / "live", total_steps=2)) == 0
    assert cli(train_args(fx, tmp_path / "cached", total_steps=2, latent_cache=cache)) == 0
    lines = re.findall(r"(\d+) VAE image\(s\) from the latent cache, (\d+) encoded live", capsys.readouterr().out)
    assert len(lines) == 2 and lines[0][0] == "0" and int(lines[1][0]) > 0, lines  # the live run, then the cached
    live, cached = records(tmp_path / "live" / "results"), records(tmp_path / "cached" / "results")
    for step in (1, 2):
        for key in ("loss", "ce", "mse"):
            assert cached[step][key] == pytest.approx(live[step][key], rel=1e-6, abs=1e-7), (step, key)


def test_a_stale_cache_is_refused_naming_what_differs(fx, vae, cache, tmp_path, capsys):
    other = training_vae("", "tiny", SEED + 1)
    latents, why = _open(cache, other, fx.groups)
    assert latents is None and "sha256" in why and "bagel data latents" in why
    groups = yaml.safe_load(fx.groups.read_text())
    groups["t2i_pretrain"]["image_transform_args"]["max_image_size"] = 48
    changed = tmp_path / "groups.yaml"
    changed.write_text(yaml.safe_dump(groups, sort_keys=False))
    latents, why = _open(cache, vae, changed)
    assert latents is None and "t2i_pretrain" in why and "image_transform_args" in why
    with pytest.raises(ConfigError, match="does not fit"):
        build_latent_cache(other, load_dataset_config(fx.groups), fx.index_dir, cache)
    # the trainer says so and trains live
    assert cli(train_args(fx, tmp_path / "run", total_steps=1, global_seed=SEED + 5, latent_cache=cache)) == 0
    out = capsys.readouterr().out
    assert "WARNING" in out and "latent cache refused" in out and "encoded live" in out


def test_build_resumes_after_a_kill_and_re_encodes_changed_files(fx, vae, tmp_path):
    config = load_dataset_config(fx.groups)
    out = tmp_path / "latents"
    first = build_latent_cache(vae, config, fx.index_dir, out)
    manifest = json.loads((out / MANIFEST).read_text())
    # a kill after one shard's rename but before the manifest listed it, and one mid-write
    name = min(manifest["shards"])
    del manifest["shards"][name]
    (out / MANIFEST).write_text(json.dumps(manifest))
    (out / SHARDS / "partial.safetensors.tmp123").write_bytes(b"torn")
    again = build_latent_cache(vae, config, fx.index_dir, out)
    assert (again.shards_written, again.shards_kept) == (1, first.shards_written - 1)
    assert not list((out / SHARDS).glob("*.tmp*"))
    source = fx.t2i_files[0]
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    latents, note = _open(out, vae, fx.groups)
    assert latents is not None and "1 left out (source file changed" in note
    third = build_latent_cache(vae, config, fx.index_dir, out)
    assert third.shards_written == 1 and third.shards_kept == first.shards_written - 1


def test_cli_writes_a_cache_the_trainer_accepts(fx, tmp_path):
    from bagel_core.cli import main

    out = tmp_path / "latents"
    argv = ["data", "latents", "--registry", str(fx.registry), "--index", str(fx.index_dir)]
    argv += ["--dataset-config", str(fx.groups), "--out", str(out), "--global-seed", str(SEED), "--quiet"]
    assert main([*argv, "--workers", "2"]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["vae"]["sha256"] == vae_identity(training_vae("", "tiny", SEED))["sha256"]
    assert {e["group"] for e in manifest["shards"].values()} == {"t2i_pretrain", "unified_edit"}
    # --for-training: only what that training reads (a new folder: the samples of its first step)
    planned = tmp_path / "planned"
    training = " ".join(train_args(fx, tmp_path / "run", make_manifest(fx, tmp_path / "m"), total_steps=3))
    argv[argv.index(str(out))] = str(planned)
    assert main([*argv, "--for-training", training, "--steps", "1"]) == 0
    coverage = json.loads((planned / MANIFEST).read_text())["coverage"]
    assert coverage["scope"] == "planned" and coverage["steps"] == 1 and coverage["world_size"] == 1
    encoded = sum(e["samples"] for e in json.loads((planned / MANIFEST).read_text())["shards"].values())
    assert 0 < encoded <= coverage["samples"] < sum(e["samples"] for e in manifest["shards"].values())
    assert main([*argv, "--for-training", training, "--steps", "0"]) == 2  # a clear error, not an empty cache
    assert main([*argv, "--for-training", "--no_such_argument 1"]) == 2


# ---- a cache scoped to what a training reads -------------------------------------------------------
def _dataloader_reads(
    argv: list[str], world_size: int, packs: int, states: list | None = None
) -> set[tuple[str, str, int, int]]:
    """What the trainer's DataLoaders actually yield: every rank's dataset (resumed from ``states``) through a
    real DataLoader with its workers, ``packs`` packs each (the reference the replay must reproduce)."""
    import itertools
    import warnings

    from torch.utils.data import DataLoader

    from bagel_core.data.tokenizer import load_tokenizer
    from bagel_core.loader.packed_dataset import collate_packed
    from bagel_core.train.args import parse_args
    from bagel_core.train.preflight import preflight
    from bagel_core.train.trainer import build_packed_dataset

    cfg = parse_args(argv, world_size=world_size, local_world_size=world_size)
    launch = preflight(cfg, world_size, world_size)
    tokenizer, _ = load_tokenizer()
    seen = set()
    for rank in range(world_size):
        dataset = build_packed_dataset(cfg, launch, Path(cfg.data.manifest), rank, world_size, tokenizer)
        if states is not None:
            dataset.load_state_dict(states[rank])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
            loader = DataLoader(dataset, batch_size=None, num_workers=cfg.data.num_workers, collate_fn=collate_packed)
            for batch in itertools.islice(iter(loader), packs):
                for e in batch["batch_data_indexes"]:
                    seen.add((e["dataset_name"], os.path.realpath(e["source_file"]), e["row_group"], e["row_index"]))
    return seen


@pytest.mark.parametrize("world_size,workers", [(1, 2), (2, 1)])
def test_planned_reads_are_the_samples_the_dataloaders_yield(fx, tmp_path, world_size, workers):
    """Ranks and DataLoader workers (round-robin), 2 packs per step, CFG dropout on (it changes token counts, so
    packing): the replay reads exactly what the training's DataLoaders yield."""
    from bagel_core.train.latents import planned_reads

    manifest = make_manifest(fx, tmp_path / "m", world_size=world_size, num_workers=workers)
    over = {"num_workers": workers, "total_steps": 3, "gradient_accumulation_steps": 2, "vae_cond_dropout_prob": 0.3}
    argv = train_args(fx, tmp_path / "run", manifest, text_cond_dropout_prob=0.1, **over)
    reads = planned_reads(argv, world_size=world_size)
    assert reads.packs_per_rank == 6 and reads.coverage()["steps"] == 3
    assert reads.samples == _dataloader_reads(argv, world_size, 6)
    fewer = planned_reads(argv, world_size=world_size, steps=1)
    assert fewer.samples and fewer.samples < reads.samples
    if world_size == 1:  # no --manifest: the replay plans it as the trainer's preflight does (same data seed)
        unplanned = train_args(fx, tmp_path / "run2", data_seed=42, text_cond_dropout_prob=0.1, **over)
        assert planned_reads(unplanned, world_size=1).samples == reads.samples


def test_planned_reads_of_a_resuming_training_start_where_its_checkpoint_stands(fx, tmp_path):
    """--auto_resume: the replay starts from the data position the checkpoint restores (3 packs in over 2
    workers, so the resumed DataLoader starts at logical worker 1) and covers the steps still to run."""
    from bagel_core.train.checkpoint import saved_data_positions, step_dir
    from bagel_core.train.latents import planned_reads

    manifest = make_manifest(fx, tmp_path / "m", num_workers=2)
    first = train_args(fx, tmp_path / "run", manifest, num_workers=2, total_steps=3, save_every=3)
    assert cli(first) == 0
    step, states = saved_data_positions(step_dir(tmp_path / "run" / "ckpt", 3), 1)
    assert step == 3 and states[0]["next_worker"] == 1
    again = train_args(fx, tmp_path / "run", manifest, num_workers=2, total_steps=5, auto_resume=True)
    reads = planned_reads(again, world_size=1)
    assert reads.from_step == 3 and reads.packs_per_rank == 2 and reads.coverage()["from_step"] == 3
    assert reads.samples == _dataloader_reads(again, 1, 2, states)
    fresh = train_args(fx, tmp_path / "fresh", manifest, num_workers=2, total_steps=2)
    assert reads.samples != planned_reads(fresh, world_size=1).samples  # not the first two steps' samples


def test_a_cache_planned_for_the_run_leaves_nothing_to_encode_live_and_grows_in_place(fx, vae, tmp_path, capsys):
    from bagel_core.train.latents import planned_reads

    config = load_dataset_config(fx.groups)
    argv = train_args(fx, tmp_path / "run", make_manifest(fx, tmp_path / "m"), total_steps=2)
    out = tmp_path / "latents"
    two = planned_reads(argv, world_size=1)
    first = build_latent_cache(vae, config, fx.index_dir, out, only=two.samples, coverage=two.coverage())
    everything = sum(len(job.rows) for job in plan_shards(fx.index_dir, config))
    assert 0 < first.samples < everything  # only what the two steps read, of the generation groups
    assert json.loads((out / MANIFEST).read_text())["coverage"]["steps"] == 2
    assert cli([*argv, "--latent_cache", str(out)]) == 0
    used = re.search(r"(\d+) VAE image\(s\) from the latent cache, (\d+) encoded live", capsys.readouterr().out)
    assert used is not None and int(used[1]) > 0 and int(used[2]) == 0, used
    # a longer plan adds only the new samples; the moments already there are kept, byte for byte
    shard = next((out / SHARDS).glob("*.safetensors"))
    before = load_file(str(shard))
    four = planned_reads(argv, world_size=1, steps=4)
    grown = build_latent_cache(vae, config, fx.index_dir, out, only=four.samples)
    planned_ok = sum(len(job.rows) for job in plan_shards(fx.index_dir, config, four.samples))  # the index's ok rows
    assert grown.samples == planned_ok - first.samples and grown.shards_written >= 1
    after = load_file(str(shard))
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert build_latent_cache(vae, config, fx.index_dir, out, only=four.samples).shards_written == 0
    complete = build_latent_cache(vae, config, fx.index_dir, out)  # scope "all" fills every shard up
    assert complete.samples == everything - first.samples - grown.samples
    entries = json.loads((out / MANIFEST).read_text())["shards"].values()
    assert all(e["complete"] for e in entries)
