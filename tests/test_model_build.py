"""Model structure: the 7b-mot key table on meta, layer variants, tiny forward/backward, routing."""

from __future__ import annotations

import torch
from model_fixtures import MIXED_SAMPLES, make_packed_batch

from bagel_core.model import build_model, preset
from bagel_core.model.bagel import shift_timesteps
from bagel_core.model.embeddings import sincos_2d_table
from bagel_core.sequence.grid import patchify, unpatchify


def released_table() -> dict[str, tuple[int, ...]]:
    """The released ema.safetensors key/shape table, written out from model.md section 7."""
    H, I, KV, V, HD = 3584, 18944, 512, 152064, 128
    t: dict[str, tuple[int, ...]] = {}
    lm = "language_model.model."
    t[lm + "embed_tokens.weight"] = (V, H)
    for i in range(28):
        p = f"{lm}layers.{i}."
        for sfx in ("", "_moe_gen"):
            a = p + "self_attn."
            t[f"{a}q_proj{sfx}.weight"], t[f"{a}q_proj{sfx}.bias"] = (H, H), (H,)
            t[f"{a}k_proj{sfx}.weight"], t[f"{a}k_proj{sfx}.bias"] = (KV, H), (KV,)
            t[f"{a}v_proj{sfx}.weight"], t[f"{a}v_proj{sfx}.bias"] = (KV, H), (KV,)
            t[f"{a}o_proj{sfx}.weight"] = (H, H)
            t[f"{a}q_norm{sfx}.weight"] = t[f"{a}k_norm{sfx}.weight"] = (HD,)
            mlp = p + ("mlp_moe_gen." if sfx else "mlp.")
            t[mlp + "gate_proj.weight"] = t[mlp + "up_proj.weight"] = (I, H)
            t[mlp + "down_proj.weight"] = (H, I)
            t[f"{p}input_layernorm{sfx}.weight"] = t[f"{p}post_attention_layernorm{sfx}.weight"] = (H,)
    t[lm + "norm.weight"] = t[lm + "norm_moe_gen.weight"] = (H,)
    t["language_model.lm_head.weight"] = (V, H)
    v = "vit_model.vision_model."
    t[v + "embeddings.patch_embedding.weight"], t[v + "embeddings.patch_embedding.bias"] = (
        (1152, 588),
        (1152,),
    )
    t[v + "embeddings.position_embedding.weight"] = (4900, 1152)
    for j in range(26):
        p = f"{v}encoder.layers.{j}."
        for proj in ("q", "k", "v", "out"):
            t[f"{p}self_attn.{proj}_proj.weight"], t[f"{p}self_attn.{proj}_proj.bias"] = (1152, 1152), (1152,)
        for ln in ("layer_norm1", "layer_norm2"):
            t[f"{p}{ln}.weight"] = t[f"{p}{ln}.bias"] = (1152,)
        t[p + "mlp.fc1.weight"], t[p + "mlp.fc1.bias"] = (4304, 1152), (4304,)
        t[p + "mlp.fc2.weight"], t[p + "mlp.fc2.bias"] = (1152, 4304), (1152,)
    t[v + "post_layernorm.weight"] = t[v + "post_layernorm.bias"] = (1152,)
    t["time_embedder.mlp.0.weight"], t["time_embedder.mlp.0.bias"] = (H, 256), (H,)
    t["time_embedder.mlp.2.weight"], t["time_embedder.mlp.2.bias"] = (H, H), (H,)
    t["vae2llm.weight"], t["vae2llm.bias"] = (H, 64), (H,)
    t["llm2vae.weight"], t["llm2vae.bias"] = (64, H), (64,)
    t["latent_pos_embed.pos_embed"] = (4096, H)
    t["connector.fc1.weight"], t["connector.fc1.bias"] = (H, 1152), (H,)
    t["connector.fc2.weight"], t["connector.fc2.bias"] = (H, H), (H,)
    t["vit_pos_embed.pos_embed"] = (4900, H)
    return t


def test_7b_mot_on_meta_matches_released_key_table():
    model = build_model(preset("7b-mot"), "meta")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = released_table()
    assert len(want) == 1223
    assert sorted(set(want) - set(got)) == []
    assert sorted(set(got) - set(want)) == []
    assert {k: got[k] for k in want if got[k] != want[k]} == {}
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.state_dict().values()) == 14_607_260_128
    assert not model.latent_pos_embed.pos_embed.requires_grad
    assert not model.vit_pos_embed.pos_embed.requires_grad


def test_layer_module_variants_have_upstream_keys():
    for name, extra in [
        ("Qwen2DecoderLayer", set()),
        (
            "Qwen2MoEDecoderLayer",
            {"mlp_moe_gen.gate_proj.weight", "mlp_moe_gen.up_proj.weight", "mlp_moe_gen.down_proj.weight"},
        ),
    ]:
        cfg = preset("tiny")
        cfg.llm.layer_module = name
        keys = set(build_model(cfg, "meta").state_dict())
        layer0 = {k.split("layers.0.", 1)[1] for k in keys if ".layers.0." in k and "language_model" in k}
        assert {k for k in layer0 if "_moe_gen" in k} == extra
        assert ("language_model.model.norm_moe_gen.weight" in keys) == bool(extra)
    cfg = preset("tiny")
    cfg.llm.qk_norm = False
    keys = set(build_model(cfg, "meta").state_dict())
    assert not any("q_norm" in k or "k_norm" in k for k in keys)


def test_tiny_forward_backward_trains_both_experts():
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        model.llm2vae.weight.normal_(0, 0.02)
    batch = make_packed_batch(cfg, MIXED_SAMPLES)
    out = model(**batch, noise_generator=torch.Generator().manual_seed(0))
    assert out.ce.shape == (len(batch["packed_label_ids"]),)
    assert out.mse.shape == (len(batch["mse_loss_indexes"]), 64)
    loss = out.ce.mean() + out.mse.mean()
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []
    assert model.latent_pos_embed.pos_embed.grad is None
    # Fresh CE is near ln(V) scale, not a blow-up.
    assert 5 < out.ce.mean().item() < 30


def test_experts_start_identical_and_routing_uses_gen_expert():
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    params = dict(model.named_parameters())
    for name, p in params.items():
        if "_moe_gen" in name:
            assert torch.equal(p, params[name.replace("_moe_gen", "")])
    batch = make_packed_batch(cfg, MIXED_SAMPLES)
    with torch.no_grad():
        model.llm2vae.weight.normal_(0, 0.02)
        ref = model(**batch, noise_generator=torch.Generator().manual_seed(0))
        # Changing only the generation expert's MLP changes MSE (latents) ...
        model.language_model.model.layers[1].mlp_moe_gen.down_proj.weight.mul_(3.0)
        out = model(**batch, noise_generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(out.mse, ref.mse)
    # ... but not the CE of text in samples without noised latents visible to it
    # (sample 1 is pure VLM; its CE rows come first after sample 0, which has no CE).
    n_vlm = 7  # ("text", 6, True) -> 7 CE rows
    torch.testing.assert_close(out.ce[:n_vlm], ref.ce[:n_vlm])


def test_noised_latents_are_hidden_from_later_tokens():
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = make_packed_batch(cfg, [[("vae", 2, 2, True), ("text", 4, True)]])
    other = dict(batch)
    other["padded_latent"] = batch["padded_latent"] + 5.0
    with torch.no_grad():
        a = model(**batch, noise_generator=torch.Generator().manual_seed(0))
        b = model(**other, noise_generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.ce, b.ce)
    # A clean image in the same place is visible to the text.
    clean = make_packed_batch(cfg, [[("vae", 2, 2, False), ("text", 4, True)]])
    clean2 = dict(clean, padded_latent=clean["padded_latent"] + 5.0)
    with torch.no_grad():
        c = model(**clean, noise_generator=torch.Generator().manual_seed(0))
        d = model(**clean2, noise_generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(c.ce, d.ce)


def test_nested_masks_path_equals_split_path():
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        model.llm2vae.weight.normal_(0, 0.02)
        a = model(**make_packed_batch(cfg, MIXED_SAMPLES), noise_generator=torch.Generator().manual_seed(0))
        b = model(
            **make_packed_batch(cfg, MIXED_SAMPLES, with_nested_masks=True),
            noise_generator=torch.Generator().manual_seed(0),
        )
    torch.testing.assert_close(a.ce, b.ce)
    torch.testing.assert_close(a.mse, b.mse)


def test_sincos_table_layout_and_timestep_shift():
    tab = sincos_2d_table(4, 8)
    q = 2
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / q)
    i, j = 2, 3
    row = torch.from_numpy(tab[i * 4 + j])
    want = torch.cat([torch.sin(j * omega), torch.cos(j * omega), torch.sin(i * omega), torch.cos(i * omega)])
    torch.testing.assert_close(row, want)
    t = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(shift_timesteps(t, 3.0), torch.tensor([0.0, 0.75, 1.0]))
    torch.testing.assert_close(shift_timesteps(t, 1.0), t)


def test_patchify_order_and_inverse():
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(2, 4, 6)  # C=2, H=4, W=6
    tok = patchify(x, 2)
    assert tok.shape == (6, 8)
    # token 0 = rows 0-1, cols 0-1; vector order (row, col, channel), channel fastest
    assert tok[0].tolist() == [
        x[0, 0, 0],
        x[1, 0, 0],
        x[0, 0, 1],
        x[1, 0, 1],
        x[0, 1, 0],
        x[1, 1, 0],
        x[0, 1, 1],
        x[1, 1, 1],
    ]
    assert tok[1, 0] == x[0, 0, 2]  # row-major patches
    assert torch.equal(unpatchify(tok, 2, 3, 2, 2), x)


def test_flex_padding_document_does_not_change_losses():
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = make_packed_batch(cfg, MIXED_SAMPLES)
    padded = dict(
        batch,
        sample_lens=[*batch["sample_lens"], 9],
        split_lens=[*batch["split_lens"], 9],
        attn_modes=[*batch["attn_modes"], "causal"],
    )
    with torch.no_grad():
        a = model(**batch, noise_generator=torch.Generator().manual_seed(0))
        b = model(**padded, noise_generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.ce, b.ce)
    torch.testing.assert_close(a.mse, b.mse)


def test_freeze_und_leaves_only_generation_paths_and_lm_head_trainable():
    cfg = preset("tiny")
    cfg.llm.freeze_und = True
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        model.llm2vae.weight.normal_(0, 0.02)
    out = model(**make_packed_batch(cfg, MIXED_SAMPLES), noise_generator=torch.Generator().manual_seed(0))
    (out.ce.mean() + out.mse.mean()).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}
    gen_side = ("_moe_gen", "vae2llm", "llm2vae", "time_embedder", "lm_head")
    assert with_grad and all(any(s in n for s in gen_side) for n in with_grad), sorted(with_grad)[:5]
    assert "language_model.lm_head.weight" in with_grad
    assert "language_model.model.layers.0.mlp_moe_gen.up_proj.weight" in with_grad


def test_tiny_preset_uses_the_real_vocabulary():
    from bagel_core.data.tokenizer import load_tokenizer

    tokenizer, ids = load_tokenizer()
    cfg = preset("tiny")
    assert cfg.llm.vocab_size == preset("7b-mot").llm.vocab_size == 152064 >= len(tokenizer)
    assert max(ids.as_dict().values()) < cfg.llm.vocab_size


def test_meta_build_then_init_weights_is_usable():
    cfg = preset("tiny")
    model = build_model(cfg, "meta").to_empty(device="cpu").init_weights()
    ref = build_model(cfg)
    torch.testing.assert_close(model.latent_pos_embed.pos_embed, ref.latent_pos_embed.pos_embed)
    assert not model.llm2vae.weight.any()
    layer = model.language_model.model.layers[0]
    assert torch.equal(layer.mlp.up_proj.weight, layer.mlp_moe_gen.up_proj.weight)
    assert torch.equal(layer.input_layernorm.weight, torch.ones(cfg.llm.hidden_size))
    out = model(**make_packed_batch(cfg, MIXED_SAMPLES))
    assert torch.isfinite(out.ce).all() and torch.isfinite(out.mse).all()
    units = model.shard_units()
    assert len(units) == cfg.llm.num_hidden_layers + cfg.vit.num_hidden_layers + 5


def test_flux_vae_structure_on_meta():
    from bagel_core.model import AutoEncoder

    with torch.device("meta"):
        vae = AutoEncoder()
    sd = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert 83_000_000 < sum(v.numel() for v in vae.state_dict().values()) < 85_000_000  # "about 84 M"
    assert sd["encoder.conv_in.weight"] == (128, 3, 3, 3)
    assert sd["encoder.down.1.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
    assert sd["encoder.down.2.block.0.nin_shortcut.weight"] == (512, 256, 1, 1)
    assert sd["encoder.mid.attn_1.proj_out.weight"] == (512, 512, 1, 1)
    assert sd["encoder.conv_out.weight"] == (32, 512, 3, 3)
    assert sd["decoder.conv_in.weight"] == (512, 16, 3, 3)
    assert sd["decoder.up.1.block.0.nin_shortcut.weight"] == (256, 512, 1, 1)
    assert sd["decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert sd["decoder.up.3.upsample.conv.bias"] == (512,)
    assert "decoder.up.0.upsample.conv.bias" not in sd and "encoder.down.3.downsample.conv.bias" not in sd
    assert sum(k.startswith("decoder.up.0.block.") and k.endswith("conv1.weight") for k in sd) == 3
    assert sd["decoder.conv_out.weight"] == (3, 128, 3, 3)


def test_understanding_only_model_rejects_latents():
    import pytest

    cfg = preset("tiny")
    cfg.visual_gen = False
    model = build_model(cfg)
    assert not any(k.startswith(("vae2llm", "llm2vae", "time_embedder", "latent_pos")) for k in model.state_dict())
    vlm = make_packed_batch(cfg, [[("vit", 2, 2), ("text", 4, True)]])
    assert model(**vlm).mse is None
    with pytest.raises(ValueError, match="visual_gen=False"):
        model(**make_packed_batch(cfg, [[("text", 3, False), ("vae", 1, 2, True)]]))
