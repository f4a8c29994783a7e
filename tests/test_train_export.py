"""``bagel export``: DCP training step -> released inference layout (bf16 ema.safetensors + configs + VAE)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from bagel_core.config.errors import ConfigError
from bagel_core.data.transforms import ImageTransform
from bagel_core.inference import Inferencer, setup_models
from bagel_core.model.autoencoder import AutoEncoder
from bagel_core.model.bagel import build_model
from bagel_core.model.checkpoint_io import expected_shapes, save_model_dir
from bagel_core.model.config import extra_to_json, llm_to_json, preset, vit_to_json
from bagel_core.train.checkpoint import MARKER
from bagel_core.train.export import export_checkpoint

STEP = 40


@pytest.fixture(scope="module")
def nets():
    """Tiny config, a 'model' and a different 'ema' (fp32 state dicts), a random VAE."""
    cfg = preset("tiny")
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = build_model(cfg)
        with torch.no_grad():  # non-zero head so generation depends on the weights
            m.llm2vae.weight.normal_(0, 0.02)
        states.append({k: v.detach().clone() for k, v in m.state_dict().items()})
    torch.manual_seed(2)
    vae = AutoEncoder(cfg.vae)
    return cfg, states[0], states[1], vae.state_dict()


def _dcp_save(state: dict, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(path))


def make_step(root: Path, nets, model_sd=None, ema_sd=None, tokenizer: bool = False, step: int = STEP) -> Path:
    """A complete training step directory as the DCP trainer writes it."""
    cfg, model, ema, vae = nets
    d = root / f"step_{step}"
    d.mkdir(parents=True)
    optimizer = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]}
    _dcp_save({"model": model_sd or model, "ema": ema_sd or ema, "optimizer": optimizer}, d)
    (d / "llm_config.json").write_text(json.dumps(llm_to_json(cfg.llm)))
    (d / "vit_config.json").write_text(json.dumps(vit_to_json(cfg.vit)))
    (d / "bagel_config.json").write_text(json.dumps(extra_to_json(cfg)))
    save_file(vae, str(d / "ae.safetensors"))
    if tokenizer:
        from bagel_core.data.tokenizer import load_tokenizer

        load_tokenizer(None)[0].save_pretrained(str(d))
    (d / "train_state.json").write_text(json.dumps({"step": step, "world_size": 1}))
    torch.save({"last_epoch": step}, d / "scheduler.pt")
    (d / MARKER).write_text(f"{step}\n")
    return d


@pytest.fixture(scope="module")
def step_dir(tmp_path_factory, nets):
    return make_step(tmp_path_factory.mktemp("ckpt"), nets)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, step_dir):
    return export_checkpoint(step_dir, tmp_path_factory.mktemp("exports") / "bagel-ema")


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def _cast(sd: dict[str, torch.Tensor], dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) for k, v in sd.items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert v.dtype == b[k].dtype and torch.equal(v, b[k]), k


def _no_tmp(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if p.name.endswith(".tmp")]


def test_export_loads_for_inference_with_the_ema_in_bf16(exported, step_dir, nets):
    _, _, ema, _ = nets
    names = {p.name for p in exported.iterdir()}
    assert {"llm_config.json", "vit_config.json", "bagel_config.json", "ema.safetensors", "ae.safetensors"} <= names
    assert "tokenizer.json" in names  # the bundled tokenizer, so the directory is self-contained
    assert "model.safetensors" not in names and ".metadata" not in names
    _no_tmp(exported.parent)
    # the VAE is hard-linked (same filesystem), not copied
    assert (exported / "ae.safetensors").stat().st_ino == (step_dir / "ae.safetensors").stat().st_ino

    model, vae, _, ids = setup_models(exported, device="cpu")  # strict key/shape check inside
    assert model.dtype == torch.bfloat16 and next(vae.parameters()).dtype == torch.float32
    _assert_same(dict(model.state_dict()), _cast(ema))
    tensors, meta = _read(exported / "ema.safetensors")
    assert meta == {"format": "pt", "source": str(step_dir.resolve()), "weights": "ema", "step": str(STEP)}
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert ids["eos_token_id"] == 151645


def test_key_set_is_the_released_table_for_the_config(exported, nets):
    cfg = nets[0]
    with safe_open(str(exported / "ema.safetensors"), framework="pt") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert found == expected_shapes(build_model(cfg, "meta"))


def test_weights_model_exports_the_raw_weights(tmp_path, step_dir, nets):
    _, model, ema, _ = nets
    out = export_checkpoint(step_dir, tmp_path / "raw", weights="model")
    tensors, meta = _read(out / "ema.safetensors")  # always the released file name
    assert meta["weights"] == "model" and not (out / "model.safetensors").exists()
    _assert_same(tensors, _cast(model))
    assert not torch.equal(tensors["llm2vae.weight"], ema["llm2vae.weight"].to(torch.bfloat16))


def test_small_chunks_give_identical_output(tmp_path, step_dir, exported, nets):
    calls = []
    out = export_checkpoint(step_dir, tmp_path / "chunked", chunk_bytes=64 << 10, progress=lambda d, t: calls.append(d))
    assert len(calls) > 10 and calls == sorted(calls)  # many DCP loads, progress increasing
    # same tensors and metadata (the header's metadata order is not deterministic, so not bytes)
    chunked, meta = _read(out / "ema.safetensors")
    whole, whole_meta = _read(exported / "ema.safetensors")
    assert meta == whole_meta
    _assert_same(chunked, whole)
    fp32 = export_checkpoint(step_dir, tmp_path / "fp32", dtype=torch.float32, chunk_bytes=16 << 20)
    _assert_same(_read(fp32 / "ema.safetensors")[0], nets[2])


def test_tokenizer_files_of_the_checkpoint_are_copied(tmp_path, nets):
    step = make_step(tmp_path / "ck", nets, tokenizer=True)
    out = export_checkpoint(step, tmp_path / "out")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (step / name).read_bytes()


def test_incomplete_checkpoint_is_refused(tmp_path, nets):
    step = make_step(tmp_path / "ck", nets)
    (step / MARKER).unlink()
    with pytest.raises(ConfigError, match=rf"{step}.*no COMPLETE marker"):
        export_checkpoint(step, tmp_path / "out")
    (step / MARKER).write_text("1\n")
    with pytest.raises(ConfigError, match=rf"checkpoint root.*the latest, {step}"):
        export_checkpoint(step.parent, tmp_path / "out")
    (step / ".metadata").rename(step / "metadata.bak")
    with pytest.raises(ConfigError, match=r"\.metadata not found.*--config-from"):
        export_checkpoint(step, tmp_path / "out")
    (step / "metadata.bak").rename(step / ".metadata")
    (step / "ae.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"lacks ae\.safetensors.*--config-from"):
        export_checkpoint(step, tmp_path / "out")
    (step / "vit_config.json").unlink()
    with pytest.raises(ConfigError, match=r"lacks vit_config\.json"):
        export_checkpoint(step, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    _no_tmp(tmp_path)


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path, nets):
    _, _, ema, _ = nets
    bad = dict(ema)
    del bad["llm2vae.bias"]
    bad["extra.weight"] = torch.zeros(2)
    bad["vae2llm.weight"] = torch.zeros(3, 3)
    step = make_step(tmp_path / "ck", nets, ema_sd=bad)
    with pytest.raises(ConfigError) as err:
        export_checkpoint(step, tmp_path / "out")
    msg = str(err.value)
    assert str(step) in msg and "'ema'" in msg
    assert "1 missing keys: llm2vae.bias" in msg
    assert "1 unexpected keys: extra.weight" in msg
    assert "1 keys with a different shape: vae2llm.weight file (3, 3)" in msg
    # the model weights of the same checkpoint are fine
    export_checkpoint(step, tmp_path / "out", weights="model")
    _no_tmp(tmp_path)


def test_damaged_checkpoint_fails_cleanly(tmp_path, nets):
    step = make_step(tmp_path / "ck", nets)
    for shard in step.glob("*.distcp"):
        shard.unlink()
    with pytest.raises(ConfigError, match=r"reading the 'ema' tensors failed.*distcp"):
        export_checkpoint(step, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    _no_tmp(tmp_path)


def test_existing_output_needs_overwrite(tmp_path, step_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty.*--overwrite"):
        export_checkpoint(step_dir, out)
    export_checkpoint(step_dir, out, overwrite=True)
    assert (out / "ema.safetensors").is_file() and not (out / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(ConfigError, match="checkpoint / config directory itself"):
        export_checkpoint(step_dir, step_dir, overwrite=True)


def test_upstream_folder_with_config_from(tmp_path, nets):
    cfg, model, ema, vae_sd = nets
    ref = build_model(cfg, "meta")
    vae = AutoEncoder(cfg.vae)
    vae.load_state_dict(vae_sd)
    from bagel_core.data.tokenizer import load_tokenizer

    release = save_model_dir(tmp_path / "release", ref, vae, load_tokenizer(None)[0], state_dict=ema)  # configs+ae
    upstream = tmp_path / "results" / "checkpoints" / "0001000"
    upstream.mkdir(parents=True)
    save_file(model, str(upstream / "model.safetensors"))
    save_file(ema, str(upstream / "ema.safetensors"))
    with pytest.raises(ConfigError, match="upstream checkpoint folder.*--config-from"):
        export_checkpoint(upstream, tmp_path / "out")
    out = export_checkpoint(upstream, tmp_path / "out", weights="model", config_from=release)
    tensors, meta = _read(out / "ema.safetensors")
    assert meta["step"] == "1000" and meta["weights"] == "model"
    _assert_same(tensors, _cast(model))
    assert (out / "tokenizer.json").read_bytes() == (release / "tokenizer.json").read_bytes()
    loaded, *_ = setup_models(out, device="cpu")
    assert loaded.language_model.model.embed_tokens.weight.dtype == torch.bfloat16
    (upstream / "ema.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"ema\.safetensors not found.*--weights model"):
        export_checkpoint(upstream, tmp_path / "out2", config_from=release)


def test_cli_export(tmp_path, step_dir, nets, capsys):
    from bagel_core.train.cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="cmd"))
    out = tmp_path / "cli-out"
    args = parser.parse_args(
        ["export", "--checkpoint", str(step_dir), "--out", str(out), "--weights", "model", "--dtype", "fp32"]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr()
    assert f"step {STEP}" in printed.out and f"{len(nets[1])} tensors" in printed.out
    assert "ema.safetensors" in printed.out and "ae.safetensors" in printed.out
    assert "GiB" in printed.err
    _assert_same(_read(out / "ema.safetensors")[0], nets[1])
    args = parser.parse_args(["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    with pytest.raises(ConfigError, match="is not a directory"):
        args.func(args)


def test_cli_parser_imports_no_torch():
    code = (
        "import argparse, sys; from bagel_core.train.cli import add_parser; "
        "add_parser(argparse.ArgumentParser().add_subparsers()); "
        "print(sorted(m for m in ('torch', 'safetensors', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_inference_smoke_on_the_export(exported):
    # fp32 keeps the tiny CPU matmuls fast; the weights are the exported bf16 values
    model, vae, tokenizer, ids = setup_models(exported, device="cpu", dtype=torch.float32)
    inf = Inferencer(
        model,
        vae,
        tokenizer,
        ids,
        vae_transform=ImageTransform(64, 32, 16),
        vit_transform=ImageTransform(56, 28, 14),
    )
    img = inf.generate("a red cube", height=32, width=32, num_timesteps=3, seed=0)
    assert img.size == (32, 32) and img.mode == "RGB"
    answer = inf.understand(Image.new("RGB", (40, 30), (200, 10, 10)), "What colour is it?", max_new_tokens=4)
    assert isinstance(answer, str)
