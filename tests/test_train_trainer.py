"""The trainer in one process (the same FSDP2 + DCP path as torchrun, on a one-rank group): the loss
falls, resume is bit-exact, checkpoints are atomic, freezing and branch switches, model directories,
step_final for inference, the dry-run plan and the errors before launch."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from packed_fixtures import make_manifest, small_fixture
from safetensors import safe_open
from safetensors.torch import load_file
from train_fixtures import full_state, records, train_args, trainer_session

from bagel_core.config.errors import ConfigError
from bagel_core.model import AutoEncoder, build_model, preset, save_model_dir
from bagel_core.model.checkpoint_io import expected_shapes
from bagel_core.train import checkpoint as ckpt_module
from bagel_core.train.__main__ import cli
from bagel_core.train.args import parse_args
from bagel_core.train.checkpoint import MARKER, complete_steps, latest_checkpoint, step_dir
from bagel_core.train.optim import lr_lambda


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return small_fixture(tmp_path_factory.mktemp("train") / "data")


def _run(argv: list[str]) -> None:
    assert cli(argv) == 0


# ---- schedules -------------------------------------------------------------------------------------
def test_lr_schedule_warmup_constant_cosine():
    cfg = parse_args(["--warmup_steps", "4", "--total_steps", "14", "--lr", "1e-3", "--min_lr", "1e-5"])
    f = lr_lambda(cfg.training)
    assert [f(k) for k in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0] and f(100) == 1.0
    cfg.training.lr_scheduler = "cosine"
    g = lr_lambda(cfg.training)
    assert g(0) == 0.0 and g(4) == pytest.approx(1.0) and g(14) == pytest.approx(0.01)
    assert g(9) == pytest.approx(0.5 * 0.99 + 0.01)


# ---- training, logging, step_final -------------------------------------------------------------------
def test_loss_falls_logs_upstream_line_and_step_final_serves_inference(fx, tmp_path, capsys):
    _run(train_args(fx, tmp_path, total_steps=14, lr=3e-3, save_every=7))
    out = capsys.readouterr().out
    recs = records(tmp_path / "results")
    assert sorted(recs) == list(range(1, 15))
    losses = [recs[s]["loss"] for s in sorted(recs)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    assert "(step=0000014) Train Loss mse: " in out and ", Train Loss ce: " in out and "Tokens/Sec: " in out
    assert "MFU: " in out and "Training for 14 steps, starting at 0..." in out
    assert (tmp_path / "results" / "log.txt").read_text().count("Train Steps/Sec") == 14
    assert complete_steps(tmp_path / "ckpt") == [7, 14]
    # step_final: released layout, released key set for the config, bf16 EMA; serves inference
    final = tmp_path / "ckpt" / "step_final"
    assert {p.name for p in final.iterdir()} >= {
        "llm_config.json",
        "vit_config.json",
        "ema.safetensors",
        "ae.safetensors",
    }
    with safe_open(str(final / "ema.safetensors"), framework="pt") as f:
        keys = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        assert f.get_tensor("language_model.lm_head.weight").dtype == torch.bfloat16
    assert keys == expected_shapes(build_model(preset("tiny"), "meta"))
    from bagel_core.inference import Inferencer, setup_models

    model, vae, tokenizer, ids = setup_models(final, device="cpu", dtype=torch.float32)
    inf = Inferencer(model, vae, tokenizer, ids)
    image = inf.generate(prompt="a red square", width=32, height=32, num_timesteps=3, seed=0)
    assert image.size == (32, 32)
    answer = inf.understand(image, "what is drawn?", max_new_tokens=4)
    assert isinstance(answer, str)


def test_resume_is_bit_exact(fx, tmp_path):
    _run(train_args(fx, tmp_path / "a", total_steps=6))
    _run(train_args(fx, tmp_path / "b", total_steps=3))
    _run(train_args(fx, tmp_path / "b", total_steps=6, auto_resume=True))
    a, b = records(tmp_path / "a" / "results"), records(tmp_path / "b" / "results")
    assert [a[s]["loss"] for s in range(1, 7)] == [b[s]["loss"] for s in range(1, 7)]
    assert [a[s]["lr"] for s in range(1, 7)] == [b[s]["lr"] for s in range(1, 7)]
    wa = load_file(str(tmp_path / "a" / "ckpt" / "step_final" / "ema.safetensors"))
    wb = load_file(str(tmp_path / "b" / "ckpt" / "step_final" / "ema.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    da = torch.load(step_dir(tmp_path / "a" / "ckpt", 6) / "data" / "rank_00000.pt", weights_only=True)
    db = torch.load(step_dir(tmp_path / "b" / "ckpt", 6) / "data" / "rank_00000.pt", weights_only=True)
    assert da == db
    log = (tmp_path / "b" / "results" / "log.txt").read_text()
    assert "resumed" in log and "at step 3 (exact: same world size)" in log


def test_save_interrupted_midway_never_becomes_latest(fx, tmp_path, monkeypatch):
    argv = train_args(fx, tmp_path, total_steps=3, save_every=1, keep_last_k=2, log_every=10)
    _run(argv)
    ckpt = tmp_path / "ckpt"
    assert complete_steps(ckpt) == [2, 3] and {p.name for p in ckpt.iterdir()} == {"step_2", "step_3", "step_final"}
    # a save that dies after the DCP shards are written (before the marker) leaves no step_4
    calls = {"n": 0}
    real = ckpt_module._fsync

    def dying_fsync(path):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError("simulated crash during the save")
        real(path)

    monkeypatch.setattr(ckpt_module, "_fsync", dying_fsync)
    with pytest.raises(OSError, match="simulated crash"):
        cli(train_args(fx, tmp_path, total_steps=4, save_every=1, keep_last_k=2, auto_resume=True))
    monkeypatch.undo()
    assert complete_steps(ckpt) == [2, 3] and (ckpt / ".step_4.tmp").is_dir()
    # a half-written newer directory without the marker is ignored as well
    (step_dir(ckpt, 9)).mkdir()
    (step_dir(ckpt, 9) / "__0_0.distcp").write_bytes(b"partial")
    assert latest_checkpoint(ckpt) == step_dir(ckpt, 3)
    _run(train_args(fx, tmp_path, total_steps=4, save_every=1, keep_last_k=2, auto_resume=True))
    assert complete_steps(ckpt) == [3, 4] and (step_dir(ckpt, 4) / MARKER).read_text() == "4\n"
    assert not (ckpt / ".step_4.tmp").exists()


def test_model_only_resume_takes_the_ema(fx, tmp_path):
    _run(train_args(fx, tmp_path / "a", total_steps=2))
    src = step_dir(tmp_path / "a" / "ckpt", 2)
    argv = train_args(fx, tmp_path / "b", resume_from=src, resume_model_only=True, finetune_from_ema=True)
    with trainer_session(argv) as tr:
        assert tr.step == 0 and tr.scheduler.last_epoch == 0
        model, ema = full_state(tr.model), full_state(tr.ema)
    exported = load_file(str(tmp_path / "a" / "ckpt" / "step_final" / "ema.safetensors"))
    assert all(torch.equal(model[k], ema[k]) for k in model)
    assert all(torch.equal(model[k].bfloat16(), exported[k]) for k in exported)


def test_frozen_parameters_stay_bit_identical(fx, tmp_path):
    argv = train_args(fx, tmp_path, total_steps=2, freeze_vit=True, freeze_llm=True)
    with trainer_session(argv) as tr:
        before = full_state(tr.model)
        tr.run()
        after = full_state(tr.model)
    frozen = [k for k in before if k.startswith(("vit_model.", "language_model."))]
    trained = [k for k in before if k.startswith(("connector.", "vae2llm.", "llm2vae.", "time_embedder."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in trained)


def _groups_only(fx, tmp_path, keep: set[str]):
    groups = yaml.safe_load(fx.groups.read_text())
    path = tmp_path / "groups.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in groups.items() if k in keep}))
    return path


def test_visual_gen_false_and_visual_und_false_train_on_matching_data(fx, tmp_path):
    vlm_only = _groups_only(fx, tmp_path, {"vlm_sft"})
    _run(train_args(fx, tmp_path / "und", dataset_config_file=vlm_only, visual_gen=False, total_steps=2))
    recs = records(tmp_path / "und" / "results")
    assert all(r["mse"] == 0.0 and r["ce"] > 0 for r in recs.values())
    t2i_only = _groups_only(fx, tmp_path, {"t2i_pretrain"})
    _run(train_args(fx, tmp_path / "gen", dataset_config_file=t2i_only, visual_und=False, total_steps=2))
    recs = records(tmp_path / "gen" / "results")
    assert all(r["mse"] > 0 for r in recs.values())
    keys = load_file(str(tmp_path / "gen" / "ckpt" / "step_final" / "ema.safetensors")).keys()
    assert not any(k.startswith("vit_model.") for k in keys) and any(k.startswith("llm2vae.") for k in keys)


def test_contradictions_fail_before_launch(fx, tmp_path, capsys):
    full = train_args(fx, tmp_path)
    assert cli([*full, "--visual_und", "False"]) == 2
    assert "--visual_und False builds no ViT" in capsys.readouterr().err
    assert cli([*full, "--max_latent_size", "2"]) == 2
    err = capsys.readouterr().err
    assert "max_latent_size 2" in err and "--max_latent_size 4" in err
    assert cli([*full, "--model_path", str(tmp_path / "nope")]) == 2
    assert "not a BAGEL model directory" in capsys.readouterr().err
    assert cli([*full, "--attn_backend", "flex"]) == 2
    assert "needs a GPU" in capsys.readouterr().err
    manifest = make_manifest(fx, tmp_path / "m2", world_size=2)
    assert cli([*full, "--manifest", str(manifest)]) == 2
    assert "planned for world_size=2, this launch has world_size=1" in capsys.readouterr().err
    placeholder = tmp_path / "placeholder.yaml"
    placeholder.write_text(fx.registry.read_text().replace(str(fx.root), "your_data_path", 1))
    assert cli([*train_args(fx, tmp_path, dataset_info=placeholder)]) == 2
    assert "your_data_path" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()  # nothing ran


def test_dry_run_prints_where_everything_comes_from(fx, tmp_path, capsys):
    assert cli([*train_args(fx, tmp_path), "--dry_run", "True"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["world_size"] == 1 and plan["mesh"] == {"strategy": "FULL_SHARD", "num_replicate": 1, "num_shard": 1}
    assert "training from scratch" in plan["state"]["model weights"]
    assert plan["state"]["optimizer + schedule"] == "fresh (step 0)"
    assert not (tmp_path / "results").exists()


def test_weights_from_a_model_directory(fx, tmp_path, capsys):
    torch.manual_seed(3)
    cfg = preset("tiny")
    src = build_model(cfg)
    with torch.no_grad():  # a stored table that differs from the exact one (as bf16 rounding does)
        src.latent_pos_embed.pos_embed.add_(1e-2)
    save_model_dir(tmp_path / "hf", src, vae=AutoEncoder(cfg.vae), dtype=torch.float32)
    argv = train_args(fx, tmp_path, model_path=tmp_path / "hf", finetune_from_hf=True, total_steps=1)
    assert cli([*argv, "--dry_run", "True"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]["state"]
    assert plan["model weights"].endswith("ema.safetensors") or str(tmp_path / "hf") in plan["model weights"]
    assert "finetune_from_hf True without --resume_from" in plan["note"]
    with trainer_session(argv) as tr:
        loaded = full_state(tr.model)
    reference = src.state_dict()
    for key, value in reference.items():
        if key == "latent_pos_embed.pos_embed":  # recomputed in fp32, not the stored table
            fresh = build_model(cfg).latent_pos_embed.pos_embed
            assert torch.equal(loaded[key], fresh) and not torch.equal(loaded[key], value)
        else:
            assert torch.equal(loaded[key], value), key


def test_step_tokens_normalise_over_the_whole_step():
    from bagel_core.model.bagel import BagelLossTerms
    from bagel_core.train.loss import StepTokens, local_token_counts, micro_loss

    batch = {
        "ce_loss_indexes": torch.arange(4),
        "mse_loss_indexes": torch.arange(2),
        "ce_loss_weights": torch.tensor([1.0, 1.0, 0.5, 0.5]),
    }
    assert local_token_counts(batch, reweighting=False) == (4.0, 2)
    assert local_token_counts(batch, reweighting=True) == (3.0, 2)
    terms = BagelLossTerms(ce=torch.tensor([1.0, 2.0, 3.0, 4.0]), mse=torch.ones(2, 64) * 0.5)
    # this micro-batch holds half of the step's CE tokens and a quarter of its MSE tokens, world size 2
    loss, ce, mse = micro_loss(terms, batch, StepTokens(ce=8.0, mse=8), 2, 1.0, 1.0, False)
    assert (ce, mse) == (10.0, 1.0)
    assert loss.item() == pytest.approx(2 * 10.0 / 8 + 2 * 1.0 / 8)
    with pytest.raises(RuntimeError, match="neither CE nor MSE"):
        micro_loss(BagelLossTerms(ce=None, mse=None), batch, StepTokens(1.0, 1), 1, 1.0, 1.0, False)


def test_resume_from_an_unknown_folder_is_an_error(fx, tmp_path):
    with pytest.raises(ConfigError, match="neither a complete step directory"):
        from bagel_core.train.build import plan_weights

        plan_weights(parse_args(train_args(fx, tmp_path, resume_from=tmp_path)))


def merge_packs(a: dict, b: dict) -> dict:
    """One pack holding the samples of ``a`` then ``b`` (understanding-only packs: text and ViT)."""
    shift = a["sequence_length"]
    out = {"sequence_length": shift + b["sequence_length"]}
    for key in ("sample_lens", "split_lens", "attn_modes", "batch_data_indexes"):
        out[key] = list(a[key]) + list(b[key])
    for key in (
        "packed_text_ids",
        "packed_position_ids",
        "packed_vit_tokens",
        "packed_vit_position_ids",
        "vit_token_seqlens",
        "packed_label_ids",
        "ce_loss_weights",
    ):
        out[key] = torch.cat([a[key], b[key]])
    for key in ("packed_text_indexes", "packed_vit_token_indexes", "ce_loss_indexes"):
        out[key] = torch.cat([a[key], b[key] + shift])
    assert set(out) == set(a) - {"data_state"}, set(a) ^ set(out)
    return out


def _gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            out[name.replace("_checkpoint_wrapped_module.", "")] = grad.detach().clone()
    return out


def test_gradient_accumulation_of_two_halves_equals_one_full_batch(fx, tmp_path, monkeypatch):
    """CE-only packs (no noise, no VAE sample): the step's gradient (after clipping, before the
    optimizer step) of two micro-batches equals that of one pack holding both."""
    from train_equivalence import streams

    vlm_only = _groups_only(fx, tmp_path, {"vlm_sft"})
    manifest = make_manifest(fx, tmp_path / "m2", world_size=2)
    argv = train_args(fx, tmp_path, dataset_config_file=vlm_only, visual_gen=False, lr=3e-3)
    from bagel_core.train import trainer as trainer_module

    grads: dict[str, dict[str, torch.Tensor]] = {}
    real_clip = trainer_module.clip_grad_norm

    def clip_and_record(model, max_norm):
        norm = real_clip(model, max_norm)
        grads[mode] = _gradients(model)
        return norm

    monkeypatch.setattr(trainer_module, "clip_grad_norm", clip_and_record)
    results = {}
    for mode in ("halves", "full"):
        with trainer_session(argv) as tr:
            p0, p1 = (next(it) for it in streams(tr, [0, 1], str(vlm_only), str(fx.registry), str(manifest)))
            stats = tr.train_step([p0, p1] if mode == "halves" else [merge_packs(p0, p1)])
            results[mode] = stats
    half, full, g_half, g_full = results["halves"], results["full"], grads["halves"], grads["full"]
    assert half["total_ce_tokens"] == full["total_ce_tokens"] and half["ce"] == pytest.approx(full["ce"], rel=1e-5)
    assert half["grad_norm"] == pytest.approx(full["grad_norm"], rel=1e-5)
    assert g_half.keys() == g_full.keys() and len(g_half) > 50
    differ = [k for k in g_half if not torch.allclose(g_half[k], g_full[k], rtol=1e-4, atol=1e-7)]
    assert not differ, differ


def _upstream_layout(fx, root) -> None:
    """What a user of the seed guides has: ``./data/dataset_info.py`` (a Python literal),
    ``./data/configs/example.yaml`` and ``models/BAGEL-7B-MoT`` (here a tiny model, max_latent_size 64)."""
    from bagel_core.config.registry import Registry

    (root / "data" / "configs").mkdir(parents=True)
    info = Registry.load(fx.registry).to_dict()
    (root / "data" / "dataset_info.py").write_text(f"DATASET_INFO = {json.dumps(info, default=str)!s}\n")
    (root / "data" / "configs" / "example.yaml").write_text(fx.groups.read_text())
    torch.manual_seed(0)
    cfg = preset("tiny")
    cfg.max_latent_size = 64
    save_model_dir(root / "models" / "BAGEL-7B-MoT", build_model(cfg), vae=AutoEncoder(cfg.vae), dtype=torch.float32)


def test_seed_guide_commands_dry_run_verbatim(fx, tmp_path, monkeypatch, capsys):
    from test_train_args import FINETUNE_41, FINETUNE_42, PRETRAIN, _command

    _upstream_layout(fx, tmp_path)
    monkeypatch.chdir(tmp_path)
    # 4.1 (one GPU): passes; fine-tunes from the model directory instead of upstream's random LLM/ViT
    world, _, argv = _command(FINETUNE_41)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    assert cli([*argv, "--dry_run", "True"]) == 0, capsys.readouterr().err
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["registry"] == "data/dataset_info.py" and plan["model"]["max_latent_size"] == 64
    assert plan["state"]["model weights"] == "models/BAGEL-7B-MoT"
    assert "finetune_from_hf True without --resume_from" in plan["state"]["note"]
    assert plan["mesh"] == {"strategy": "HYBRID_SHARD", "num_replicate": 1, "num_shard": 1}
    # 4.2 asks for --num_shard 8 on 4 processes: refused, naming both numbers and the fix
    world, _, argv = _command(FINETUNE_42)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    assert cli([*argv, "--dry_run", "True"]) == 2
    err = capsys.readouterr().err
    assert "--num_shard 8" in err and "world size 4" in err and "--num_shard 4" in err
    # pre-training (8 GPUs, flex attention, separate LLM/ViT/VAE weights): refused on this CPU machine
    world, _, argv = _command(PRETRAIN, num_nodes="1")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    assert cli([*argv, "--dry_run", "True"]) == 2
    err = capsys.readouterr().err
    assert "error: --attn_backend flex (or --use_flex True) needs a GPU" in err


def test_7b_shards_on_meta_with_the_same_code_path():
    """The released 7B configuration goes through the same activation checkpointing and fully_shard
    calls (on ``meta``: nothing is allocated), with the released state-dict keys afterwards."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from bagel_core.model.parallelize import apply_activation_checkpointing, apply_fsdp, mixed_precision
    from bagel_core.train.distributed import init_distributed, shutdown

    dist_info = init_distributed("FULL_SHARD")
    try:
        model = build_model(preset("7b-mot"), "meta")
        keys = set(model.state_dict())
        apply_fsdp(apply_activation_checkpointing(model), dist_info.mesh, mixed_precision(torch.device("cuda")))
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        assert len(units) == 28 + 26 + 3 + 2 + 1  # decoder layers, ViT layers, ViT/connector/table, gen units, root
        assert all(isinstance(p, DTensor) and p.device.type == "meta" for p in model.parameters())
        assert set(model.state_dict()) == keys and sum(p.numel() for p in model.parameters()) > 14e9
    finally:
        shutdown(dist_info)


def test_upstream_checkpoint_folder_is_a_weights_only_start(fx, tmp_path):
    """Upstream's ``0001000/`` (fp32 model.safetensors + ema.safetensors, no marker) starts a run."""
    from safetensors.torch import save_file

    torch.manual_seed(5)
    model, ema = build_model(preset("tiny")), build_model(preset("tiny"))
    folder = tmp_path / "upstream" / "0001000"
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(folder / "ema.safetensors"))
    with trainer_session(train_args(fx, tmp_path / "run", resume_from=folder)) as tr:
        assert tr.step == 0
        got_model, got_ema = full_state(tr.model), full_state(tr.ema)
    assert all(torch.equal(got_model[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(got_ema[k], v) for k, v in ema.state_dict().items())
    assert "upstream checkpoint" in (tmp_path / "run" / "results" / "log.txt").read_text()
