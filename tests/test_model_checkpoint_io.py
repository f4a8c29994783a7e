"""HF-format model directories: round trip, strict key errors, max_latent_size, bf16, VAE."""

from __future__ import annotations

import json

import pytest
import torch
from model_fixtures import MIXED_SAMPLES, make_packed_batch
from safetensors.torch import load_file, save_file

from bagel_core.config.errors import ConfigError
from bagel_core.data.tokenizer import load_tokenizer
from bagel_core.model import AutoEncoder, build_model, load_model_dir, load_vae, preset, save_model_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        model.llm2vae.weight.normal_(0, 0.02)
    vae = AutoEncoder(cfg.vae)
    out = tmp_path_factory.mktemp("tiny_ckpt")
    tokenizer, _ = load_tokenizer()
    save_model_dir(out, model, vae, tokenizer)
    return out, model, vae


def _run(model, cfg):
    with torch.no_grad():
        return model(**make_packed_batch(cfg, MIXED_SAMPLES), noise_generator=torch.Generator().manual_seed(0))


def test_directory_has_release_layout(tiny_dir):
    out, model, _ = tiny_dir
    names = {p.name for p in out.iterdir()}
    assert {"llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors"} <= names
    assert "tokenizer.json" in names or "vocab.json" in names
    vit = json.loads((out / "vit_config.json").read_text())
    assert vit["num_hidden_layers"] == model.cfg.vit.num_hidden_layers + 1  # 27-layer convention
    weights = load_file(str(out / "ema.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in weights.values())
    assert set(weights) == set(model.state_dict())
    assert not any(p.suffix == ".tmp" for p in out.iterdir())


def test_save_load_round_trip_gives_identical_outputs(tiny_dir):
    out, model, _ = tiny_dir
    loaded = load_model_dir(out, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert not loaded.latent_pos_embed.pos_embed.requires_grad
    assert loaded.language_model.lm_head.weight.requires_grad
    reference = model.to(torch.bfloat16)
    for k, v in reference.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    a, b = _run(reference, model.cfg), _run(loaded, model.cfg)
    assert torch.equal(a.ce, b.ce) and torch.equal(a.mse, b.mse)
    model.float()


def test_fp32_round_trip_and_model_weights_file(tmp_path):
    cfg = preset("tiny")
    torch.manual_seed(1)
    model = build_model(cfg)
    save_model_dir(tmp_path, model, weights_name="model.safetensors", dtype=None)
    loaded = load_model_dir(tmp_path, dtype=torch.float32)
    a, b = _run(model, cfg), _run(loaded, cfg)
    assert torch.equal(a.ce, b.ce) and torch.equal(a.mse, b.mse)


def test_vae_round_trip(tiny_dir):
    out, _model, vae = tiny_dir
    loaded = load_vae(out)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z1 = vae.encode(x, generator=torch.Generator().manual_seed(0))
        z2 = loaded.encode(x, generator=torch.Generator().manual_seed(0))
        assert z1.shape == (1, 16, 4, 4)
        assert torch.equal(z1, z2)
        assert loaded.decode(z2).shape == (1, 3, 32, 32)


def _copy_dir(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_missing_key_is_named(tiny_dir, tmp_path):
    d = _copy_dir(tiny_dir[0], tmp_path / "m")
    sd = load_file(str(d / "ema.safetensors"))
    del sd["llm2vae.bias"]
    save_file(sd, str(d / "ema.safetensors"))
    with pytest.raises(ConfigError, match=r"1 missing keys: llm2vae\.bias") as err:
        load_model_dir(d)
    assert "ema.safetensors" in str(err.value)


def test_extra_key_is_named(tiny_dir, tmp_path):
    d = _copy_dir(tiny_dir[0], tmp_path / "x")
    sd = load_file(str(d / "ema.safetensors"))
    sd["language_model.model.layers.9.mlp.gate_proj.weight"] = torch.zeros(2, 2)
    save_file(sd, str(d / "ema.safetensors"))
    with pytest.raises(ConfigError, match=r"1 unexpected keys: language_model\.model\.layers\.9\.mlp"):
        load_model_dir(d)


def test_wrong_shape_is_named(tiny_dir, tmp_path):
    d = _copy_dir(tiny_dir[0], tmp_path / "s")
    sd = load_file(str(d / "ema.safetensors"))
    sd["vae2llm.bias"] = torch.zeros(3)
    save_file(sd, str(d / "ema.safetensors"))
    with pytest.raises(ConfigError, match=r"vae2llm\.bias file \(3,\) vs model \(64,\)"):
        load_model_dir(d)


def test_max_latent_size_mismatch_is_a_clear_error(tmp_path):
    cfg = preset("tiny")
    cfg.max_latent_size = 32
    save_model_dir(tmp_path, build_model(cfg))
    # The saved bagel_config.json says 32, so it loads as is ...
    assert load_model_dir(tmp_path).latent_pos_embed.pos_embed.shape[0] == 32 * 32
    # ... but asking for the release value 64 names the field and the fix.
    with pytest.raises(ConfigError, match=r"max_latent_size 32.*max_latent_size 64"):
        load_model_dir(tmp_path, max_latent_size=64)
    # A release-style directory (no bagel_config.json) defaults to 64 and fails the same way.
    (tmp_path / "bagel_config.json").unlink()
    with pytest.raises(ConfigError, match=r"latent_pos_embed\.pos_embed has 1024 rows"):
        load_model_dir(tmp_path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_model_dir(tmp_path / "nope")
    with pytest.raises(ConfigError, match="llm_config.json not found"):
        load_model_dir(tmp_path)
    cfg = preset("tiny")
    save_model_dir(tmp_path, build_model(cfg))
    (tmp_path / "ema.safetensors").unlink()
    with pytest.raises(ConfigError, match="no ema.safetensors or model.safetensors"):
        load_model_dir(tmp_path)
    with pytest.raises(ConfigError, match="ae.safetensors not found"):
        load_vae(tmp_path)
