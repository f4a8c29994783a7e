"""Inference on a tiny random checkpoint: T2I size and determinism, understanding, editing, CFG, CLI."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from model_fixtures import save_tiny_checkpoint
from PIL import Image

from bagel_core.data.transforms import ImageTransform
from bagel_core.inference import Inferencer, cfg_combine, flow_timesteps, setup_models


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_infer"))


@pytest.fixture(scope="module")
def inferencer(tiny_path):
    # fp32 keeps tiny CPU matmuls fast; the CLI test below runs the default bf16 path.
    model, vae, tokenizer, ids = setup_models(tiny_path, device="cpu", dtype=torch.float32)
    assert model.dtype == torch.float32 and not model.training
    assert ids == {
        "bos_token_id": 151644,
        "eos_token_id": 151645,
        "start_of_image": 151652,
        "end_of_image": 151653,
    }
    # Small resize rules keep the CPU test fast; the code path is the release one.
    return Inferencer(
        model,
        vae,
        tokenizer,
        ids,
        vae_transform=ImageTransform(64, 32, 16),
        vit_transform=ImageTransform(56, 28, 14),
    )


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


def test_generate_returns_requested_size_and_is_deterministic(inferencer):
    kw = {"height": 48, "width": 32, "num_timesteps": 4, "cfg_text_scale": 4.0, "cfg_img_scale": 1.5}
    a = inferencer.generate("a red cube", seed=7, **kw)
    b = inferencer.generate("a red cube", seed=7, **kw)
    c = inferencer.generate("a red cube", seed=8, **kw)
    assert a.size == (32, 48) and a.mode == "RGB"
    assert np.array_equal(_arr(a), _arr(b))
    assert not np.array_equal(_arr(a), _arr(c))


def test_generate_rejects_sizes_beyond_max_latent_size(inferencer):
    with pytest.raises(ValueError, match="max_latent_size 64"):
        inferencer.generate("x", height=1040, width=16, num_timesteps=2)


def test_understand_decodes_text_deterministically(inferencer):
    img = Image.new("RGB", (40, 30), (200, 10, 10))
    a = inferencer.understand(img, "What colour is it?", max_new_tokens=5)
    b = inferencer.understand(img, "What colour is it?", max_new_tokens=5)
    assert isinstance(a, str) and a == b
    assert len(inferencer.tokenizer.encode(a, add_special_tokens=False)) <= 8


def test_edit_keeps_the_resized_input_size(inferencer):
    img = Image.new("RGBA", (70, 40), (0, 128, 255, 128))
    a = inferencer.edit(img, "make it green", num_timesteps=3, seed=1)
    b = inferencer.edit(img, "make it green", num_timesteps=3, seed=1)
    # VAE rule 64/32/16 on 70x40 -> 64x32 (short-edge floor 32, long edge 64 cap)
    assert a.size == (64, 32)
    assert np.array_equal(_arr(a), _arr(b))


def test_decode_context_is_not_modified(inferencer):
    ctx = inferencer.new_context()
    inferencer.push_text(ctx, "hello")
    before = (ctx.cache.length, ctx.rope, ctx.cache.keys[0].shape)
    inferencer.decode_text(ctx, max_length=3)
    assert (ctx.cache.length, ctx.rope, ctx.cache.keys[0].shape) == before
    assert before[0] == before[1] == len(inferencer.tokenizer.encode("hello")) + 2


def test_cfg_combine_rules():
    g = torch.Generator().manual_seed(0)
    c, ut, ui = (torch.randn(6, 64, generator=g) for _ in range(3))
    assert torch.equal(cfg_combine(c, ut, ui, 1.0, 2.0), c)  # image term needs text CFG
    # renorm: guided vector never longer than the conditional one (global, min 0)
    v = cfg_combine(c, ut, ui, 4.0, 1.5, "global")
    assert v.norm() <= c.norm() * (1 + 1e-5)
    raw = ut + 4.0 * (c - ut)
    raw = ui + 1.5 * (raw - ui)
    torch.testing.assert_close(cfg_combine(c, ut, ui, 4.0, 1.5, "global", renorm_min=1.0), raw)
    v = cfg_combine(c, ut, None, 4.0, 1.0, "channel")
    assert (v.norm(dim=-1) <= c.norm(dim=-1) * (1 + 1e-5)).all()
    with pytest.raises(ValueError, match="unknown cfg_renorm_type 'local'"):
        cfg_combine(c, ut, ui, 4.0, 1.0, "local")


def test_timestep_grid_matches_reference_values():
    ts = flow_timesteps(50, 3.0)
    assert ts[0] == 1.0 and ts[-1] == 0.0
    torch.testing.assert_close(ts[1:3], torch.tensor([0.9931, 0.98601]), atol=1e-4, rtol=0)
    torch.testing.assert_close(ts[-2], torch.tensor(0.05882), atol=1e-4, rtol=0)
    assert int(((ts[:-1] > 0.4) & (ts[:-1] <= 1.0)).sum()) == 41


def test_cli_text_to_image_and_understanding(tiny_path, tmp_path, capsys):
    from bagel_core.inference.cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="cmd"))
    out = tmp_path / "img.png"
    args = parser.parse_args(
        [
            "infer",
            "--model-path",
            str(tiny_path),
            "--prompt",
            "a cat",
            "--out",
            str(out),
            "--width",
            "32",
            "--height",
            "16",
            "--steps",
            "3",
            "--device",
            "cpu",
        ]
    )
    assert args.func(args) == 0
    with Image.open(out) as img:
        assert img.size == (32, 16)
    src = tmp_path / "in.png"
    Image.new("RGB", (20, 20), (9, 9, 9)).save(src)
    args = parser.parse_args(
        [
            "infer",
            "--model-path",
            str(tiny_path),
            "--image",
            str(src),
            "--question",
            "what?",
            "--max-new-tokens",
            "2",
            "--device",
            "cpu",
        ]
    )
    assert args.func(args) == 0


def test_kv_cached_prefill_equals_packed_forward():
    """Text prefill + a latent chunk through the cache == one packed pass with the same layout."""
    from bagel_core.model import build_model, preset
    from bagel_core.model.attention import packed_attention
    from bagel_core.model.qwen2_mot import Routing
    from bagel_core.sequence.layout import PackedLayout

    cfg = preset("tiny")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, 1000, (6,), generator=g)
    lat = model.embed_latents(torch.randn(4, 64, generator=g), torch.full((4,), 0.7), torch.tensor([0, 1, 64, 65]))
    marks = model.embed_text(torch.tensor([151652, 151653]))
    image = torch.cat([marks[:1], lat, marks[1:]])
    with torch.no_grad():
        cache = model.new_cache()
        model.forward_cached(model.embed_text(text), torch.arange(6), Routing.all_und(6), cache, True, True)
        gen_route = Routing.from_gen_indexes(torch.arange(1, 5), 6)
        cached = model.forward_cached(image, torch.full((6,), 6), gen_route, cache, False, False)
        layout = PackedLayout.from_splits([12], [6, 6], ["causal", "noise"])
        packed = model.language_model.model(
            torch.cat([model.embed_text(text), image]),
            torch.cat([torch.arange(6), torch.full((6,), 6)]),
            Routing.from_gen_indexes(torch.arange(7, 11), 12),
            lambda _i, q, k, v: packed_attention(q, k, v, layout),
        )
    assert cache.length == 6
    torch.testing.assert_close(cached, packed[6:], atol=1e-5, rtol=1e-5)


def test_think_mode_prefills_system_prompt_and_plan(inferencer):
    img = inferencer.generate("a dog", height=16, width=16, num_timesteps=2, seed=0, think=True, max_think_tokens=3)
    assert img.size == (16, 16)
    answer = inferencer.understand(None, "why?", max_new_tokens=3, think=True)
    assert isinstance(answer, str)
