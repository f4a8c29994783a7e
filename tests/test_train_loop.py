"""Training entry point: argument parsing, loss reduction, a short run, exact resume, checkpoints."""

from __future__ import annotations

import io
import math

import pytest
import torch
from packed_fixtures import SMALL_PARAMS, make_manifest, small_fixture
from safetensors.torch import load_file

from bagel_core.config.errors import ConfigError
from bagel_core.train.__main__ import cli
from bagel_core.train.args import TrainConfig, parse_args
from bagel_core.train.checkpoint import MARKER, complete_steps, latest_checkpoint, step_dir
from bagel_core.train.loop import Trainer
from bagel_core.train.optim import lr_lambda


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    fx = small_fixture(root / "data")
    return fx, make_manifest(fx, root / "manifest")


def _args(data, ckpt, **over) -> list[str]:
    fx, manifest = data
    base = {
        "dataset_config_file": fx.groups,
        "registry_file": fx.registry,
        "manifest_dir": manifest,
        "num_workers": 0,
        "model_preset": "tiny",
        "checkpoint_dir": ckpt,
        "results_dir": ckpt.parent / "results",
        "expected_num_tokens": SMALL_PARAMS.expected_num_tokens,
        "max_num_tokens": SMALL_PARAMS.max_num_tokens,
        "max_num_tokens_per_sample": SMALL_PARAMS.max_num_tokens_per_sample,
        "prefer_buffer_before": SMALL_PARAMS.prefer_buffer_before,
        "max_buffer_size": SMALL_PARAMS.max_buffer_size,
        "text_cond_dropout_prob": 0.0,
        "vae_cond_dropout_prob": 0.0,
        "vit_cond_dropout_prob": 0.0,
        "warmup_steps": 0,
        "lr": 1e-3,
        "ema": 0.9,
        "log_every": 1,
        "save_every": 1000,
        "total_steps": 6,
        "global_seed": 7,
    }
    base.update(over)
    out: list[str] = []
    for k, v in base.items():
        out += [f"--{k}", str(v)]
    return out


def _trainer(data, ckpt, **over) -> Trainer:
    return Trainer(parse_args(_args(data, ckpt, **over)), out=io.StringIO())


# ---- arguments -------------------------------------------------------------------------------------
def test_parse_both_spellings_and_booleans():
    cfg = parse_args(
        [
            "--visual_gen",
            "False",
            "--visual-und",
            "true",
            "--total-steps",
            "12",
            "--lr=2e-5",
            "--auto_resume",
            "--resume_from",
            "None",
            "--lr_scheduler",
            "cosine",
        ]
    )
    assert cfg.training.visual_gen is False and cfg.training.visual_und is True
    assert cfg.training.total_steps == 12 and cfg.training.lr == 2e-5 and cfg.training.auto_resume is True
    assert cfg.training.resume_from is None and cfg.training.lr_scheduler == "cosine"
    d = TrainConfig()
    assert (d.training.eps, d.training.ema, d.training.beta2, d.data.data_seed) == (1e-15, 0.9999, 0.95, 42)
    assert d.training.warmup_steps == 2000 and d.training.save_every == 2000 and d.data.num_workers == 4


def test_parse_errors_name_the_argument():
    with pytest.raises(ConfigError, match="--no_such_arg"):
        parse_args(["--no_such_arg", "1", "--lr", "1"])
    with pytest.raises(ConfigError, match="visual_gen"):
        parse_args(["--visual_gen", "maybe"])
    with pytest.raises(ConfigError, match="lr_scheduler"):
        parse_args(["--lr_scheduler", "linear"])
    assert cli(["--bogus", "x"]) == 2


def test_lr_schedule_warmup_constant_cosine():
    cfg = parse_args(["--warmup_steps", "4", "--total_steps", "14", "--lr", "1e-3", "--min_lr", "1e-5"])
    f = lr_lambda(cfg.training)
    assert [f(k) for k in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0] and f(100) == 1.0
    cfg.training.lr_scheduler = "cosine"
    g = lr_lambda(cfg.training)
    assert g(0) == 0.0 and g(4) == pytest.approx(1.0) and g(14) == pytest.approx(0.01)
    assert g(9) == pytest.approx(0.5 * 0.99 + 0.01)


# ---- training --------------------------------------------------------------------------------------
def test_loss_decreases_and_logs(data, tmp_path):
    tr = _trainer(data, tmp_path / "ckpt", total_steps=12, lr=3e-3)
    hist = tr.run()
    assert len(hist) == 12 and all(math.isfinite(h["loss"]) for h in hist)
    first, last = sum(h["loss"] for h in hist[:3]) / 3, sum(h["loss"] for h in hist[-3:]) / 3
    assert last < 0.9 * first, [round(h["loss"], 4) for h in hist]
    assert all(h["ce"] > 0 for h in hist)
    text = tr.out.getvalue()
    assert text.count("train_loss_ce") == 12 and "(step=0000011)" in text
    # final save at the end, named after the number of completed steps
    assert complete_steps(tmp_path / "ckpt") == [12]


def test_resume_is_bit_exact(data, tmp_path):
    straight = _trainer(data, tmp_path / "a", total_steps=6)
    hist_a = straight.run()
    first = _trainer(data, tmp_path / "b", total_steps=3)
    hist_b = first.run()
    del first
    second = _trainer(data, tmp_path / "b", total_steps=6, auto_resume=True)
    assert second.step == 3 and "resumed from" in second.out.getvalue()
    hist_b += second.run()
    assert [h["loss"] for h in hist_a] == [h["loss"] for h in hist_b]
    assert [h["lr"] for h in hist_a] == [h["lr"] for h in hist_b]
    wa, wb = (
        load_file(str(step_dir(tmp_path / "a", 6) / "model.safetensors")),
        load_file(str(step_dir(tmp_path / "b", 6) / "model.safetensors")),
    )
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ea, eb = straight.ema.state_dict(), second.ema.state_dict()
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    # the weights moved, and the EMA differs from the raw weights
    assert any(not torch.equal(wa[k], ea[k]) for k in wa if wa[k].is_floating_point())
    assert straight.dataset.state_dict() == second.dataset.state_dict()


def test_incomplete_checkpoint_ignored_and_keep_last_k(data, tmp_path):
    ckpt = tmp_path / "ckpt"
    tr = _trainer(data, ckpt, total_steps=5, save_every=1, keep_last_k=2, log_every=10)
    tr.run()
    assert complete_steps(ckpt) == [4, 5] and sorted(p.name for p in ckpt.iterdir()) == ["step_4", "step_5"]
    # a half-written newer directory (no marker) and a stale temp dir are ignored
    (step_dir(ckpt, 9)).mkdir()
    (step_dir(ckpt, 9) / "model.safetensors").write_bytes(b"partial")
    (ckpt / ".step_10.tmp").mkdir()
    assert latest_checkpoint(ckpt) == step_dir(ckpt, 5)
    resumed = _trainer(data, ckpt, total_steps=6, auto_resume=True, keep_last_k=2)
    assert resumed.step == 5
    assert (step_dir(ckpt, 5) / MARKER).read_text() == "5\n"
    resumed.run()
    assert complete_steps(ckpt) == [5, 6]


def test_model_only_resume_from_ema(data, tmp_path):
    tr = _trainer(data, tmp_path / "a", total_steps=2)
    tr.run()
    src = step_dir(tmp_path / "a", 2)
    ft = _trainer(data, tmp_path / "b", resume_from=src, resume_model_only=True, finetune_from_ema=True)
    assert ft.step == 0 and ft.scheduler.last_epoch == 0
    ema = load_file(str(src / "ema.safetensors"))
    assert all(torch.equal(v, ema[k]) for k, v in ft.model.state_dict().items())


@pytest.mark.slow
def test_resume_is_bit_exact_with_dataloader_workers(tmp_path_factory, tmp_path):
    root = tmp_path_factory.mktemp("train_workers")
    fx = small_fixture(root / "data")
    data2 = (fx, make_manifest(fx, root / "manifest", num_workers=2))
    hist_a = _trainer(data2, tmp_path / "a", total_steps=4, num_workers=2).run()
    hist_b = _trainer(data2, tmp_path / "b", total_steps=2, num_workers=2).run()
    hist_b += _trainer(data2, tmp_path / "b", total_steps=4, num_workers=2, auto_resume=True).run()
    assert [h["loss"] for h in hist_a] == [h["loss"] for h in hist_b]
    assert [h["tokens"] for h in hist_a] == [h["tokens"] for h in hist_b]
    wa, wb = (
        load_file(str(step_dir(tmp_path / "a", 4) / "model.safetensors")),
        load_file(str(step_dir(tmp_path / "b", 4) / "model.safetensors")),
    )
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_model_and_vae_from_a_model_dir(data, tmp_path):
    from bagel_core.model import AutoEncoder, build_model, preset, save_model_dir

    torch.manual_seed(3)
    cfg = preset("tiny")
    src = build_model(cfg)
    save_model_dir(tmp_path / "hf", src, vae=AutoEncoder(cfg.vae), dtype=torch.float32)
    tr = _trainer(
        data, tmp_path / "ckpt", model_path=tmp_path / "hf", total_steps=2, max_latent_size=cfg.max_latent_size
    )
    saved = src.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in tr.model.state_dict().items())
    hist = tr.run()
    assert len(hist) == 2 and all(math.isfinite(h["loss"]) for h in hist)


def test_reduce_loss_per_token_means_and_reweighting():
    from bagel_core.model import BagelLossTerms
    from bagel_core.train.loop import reduce_loss

    ce = torch.tensor([1.0, 2.0, 3.0, 6.0])
    mse = torch.stack([torch.full((64,), 0.5), torch.arange(64, dtype=torch.float32)])
    batch = {"ce_loss_weights": torch.tensor([1.0, 1.0, 0.5, 0.5])}
    loss, ce_v, mse_v = reduce_loss(BagelLossTerms(ce=ce, mse=mse), batch, 2.0, 0.5, False)
    assert ce_v == 3.0 and mse_v == pytest.approx((0.5 + 31.5) / 2)
    assert float(loss) == pytest.approx(2.0 * 3.0 + 0.5 * 16.0)
    _, ce_w, _ = reduce_loss(BagelLossTerms(ce=ce, mse=None), batch, 1.0, 1.0, True)
    assert ce_w == pytest.approx((1 + 2 + 1.5 + 3) / 3)
    with pytest.raises(RuntimeError):
        reduce_loss(BagelLossTerms(ce=None, mse=None), batch, 1.0, 1.0, False)
