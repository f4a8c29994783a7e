"""Pre-training from separate components (upstream's --llm_path / --vit_path / --vae_path): Hugging Face
Qwen2 and SigLIP checkpoints and FLUX's ae.safetensors become one BAGEL with released keys."""

from __future__ import annotations

import json

import pytest
import torch
from packed_fixtures import small_fixture
from safetensors.torch import load_file, save_file
from train_fixtures import full_state, records, train_args, trainer_session

from bagel_core.config.errors import ConfigError
from bagel_core.model import AutoEncoder, build_model
from bagel_core.model.checkpoint_io import expected_shapes
from bagel_core.model.components import vit_weights_from_hf, weights_from_components
from bagel_core.model.config import BagelConfig, ViTConfig
from bagel_core.train.__main__ import cli
from bagel_core.train.args import parse_args
from bagel_core.train.build import model_config, plan_weights


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    """A tiny Qwen2 (HF layout), a 3-layer SigLIP (HF layout, 980 px / 14) and a FLUX-shaped VAE."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    root = tmp_path_factory.mktemp("components")
    torch.manual_seed(1)
    qwen = Qwen2ForCausalLM(
        Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=152064, tie_word_embeddings=False)
    )  # fmt: skip
    qwen.save_pretrained(root / "qwen")
    siglip = SiglipVisionModel(
        SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=980, patch_size=14)
    )  # fmt: skip
    siglip.save_pretrained(root / "siglip")
    vae = AutoEncoder(BagelConfig().vae)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(root / "ae.safetensors"))
    return root, qwen.state_dict(), siglip.state_dict(), vae.state_dict()


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return small_fixture(tmp_path_factory.mktemp("components_data") / "data")


def _args(fx, components, root, **over):
    base, *_ = components
    over = {"llm_path": base / "qwen", "vit_path": base / "siglip", "vae_path": base / "ae.safetensors", **over}
    argv = train_args(fx, root, **over)
    return [a for a in argv if a not in ("--model_preset", "tiny")]


def test_weights_map_onto_the_released_keys(fx, components, tmp_path):
    base, qwen, siglip, _ = components
    cfg = model_config(parse_args(argv := _args(fx, components, tmp_path)), plan_weights(parse_args(argv)))
    assert cfg.vit.num_hidden_layers == 2  # 3 in the checkpoint + 1 + vit_select_layer (-2)
    assert cfg.llm.layer_module == "Qwen2MoTDecoderLayer" and cfg.llm.qk_norm
    state = weights_from_components(cfg, base / "qwen", base / "siglip")
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_shapes(build_model(cfg, "meta"))
    assert torch.equal(
        state["language_model.model.layers.1.mlp.up_proj.weight"], qwen["model.layers.1.mlp.up_proj.weight"]
    )
    assert torch.equal(state["language_model.lm_head.weight"], qwen["lm_head.weight"])
    # copy_init_moe: the generation expert starts identical; Qwen2.5 has no per-head q/k norms: ones
    gen = state["language_model.model.layers.0.self_attn.q_proj_moe_gen.weight"]
    assert torch.equal(gen, qwen["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(state["language_model.model.layers.0.self_attn.q_norm.weight"], torch.ones(16))
    # SigLIP: conv patch embedding as Linear (out, row, column, channel); the third layer is not built
    conv = siglip["embeddings.patch_embedding.weight"]
    assert torch.equal(
        state["vit_model.vision_model.embeddings.patch_embedding.weight"], conv.permute(0, 2, 3, 1).reshape(32, -1)
    )
    assert not any(k.startswith("vit_model.vision_model.encoder.layers.2.") for k in state)
    assert torch.equal(state["llm2vae.weight"], torch.zeros_like(state["llm2vae.weight"]))


def test_vit_keys_with_the_vision_model_level(components, tmp_path):
    """The upstream SigLIP folder was saved by an older transformers: keys start with ``vision_model.``."""
    base, _, siglip, _ = components
    folder = tmp_path / "siglip_old"
    folder.mkdir()
    (folder / "config.json").write_text((base / "siglip" / "config.json").read_text())
    save_file({f"vision_model.{k}": v.contiguous() for k, v in siglip.items()}, str(folder / "model.safetensors"))
    cfg = BagelConfig(vit=ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2))
    old, new = vit_weights_from_hf(folder, cfg), vit_weights_from_hf(base / "siglip", cfg)
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)


def test_pretraining_from_components_trains_and_exports(fx, components, tmp_path, capsys):
    base, qwen, _, vae = components
    argv = _args(fx, components, tmp_path, total_steps=2)
    assert cli([*argv, "--dry_run", "True"]) == 0
    state = json.loads(capsys.readouterr().out)["plan"]["state"]
    assert state["model weights"].startswith(f"LLM {base / 'qwen'}, ViT {base / 'siglip'}")
    assert state["VAE"] == str(base / "ae.safetensors") and "copy_init_moe" in state["note"]
    with trainer_session(argv) as tr:
        loaded = full_state(tr.model)
        assert torch.equal(loaded["language_model.model.embed_tokens.weight"], qwen["model.embed_tokens.weight"])
        assert all(torch.equal(tr.vae.state_dict()[k], v) for k, v in vae.items())
        tr.run()
    assert sorted(records(tmp_path / "results")) == [1, 2]
    final = load_file(str(tmp_path / "ckpt" / "step_final" / "ema.safetensors"))
    assert "language_model.model.layers.0.mlp_moe_gen.up_proj.weight" in final


def test_missing_component_is_named(fx, components, tmp_path):
    with pytest.raises(ConfigError, match="--vit_path .* does not exist"):
        plan_weights(parse_args(_args(fx, components, tmp_path, vit_path=tmp_path / "nope")))
