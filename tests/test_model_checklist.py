"""model.md section 12 (compatibility checklist) and training.md 4.1, item by item, on tiny shapes.

Each test pins one convention against an independent, explicit computation written from the
reference text (not from the implementation under test): per-token MoT routing with a naive
attention loop, qk-norm before RoPE, sinusoid layouts, flow-matching inputs and targets, VAE
latent scale/shift and geometry, and the release's JSON configs.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from model_fixtures import make_packed_batch

from bagel_core.model import AutoEncoder, build_model, preset, read_config
from bagel_core.model.attention import packed_attention
from bagel_core.model.bagel import shift_timesteps
from bagel_core.model.config import VAEConfig
from bagel_core.model.embeddings import TimestepEmbedder, sincos_2d_table
from bagel_core.model.qwen2_mot import Routing
from bagel_core.sequence.grid import grid_position_ids, interpolated_position_ids, patchify
from bagel_core.sequence.layout import PackedLayout, dense_mask

# ---------------------------------------------------------------- naive MoT reference (model.md 3)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def _rope_one(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """NeoX rotate-half on one head vector: pairs (j, j + hd/2) rotated by pos * theta^(-2j/hd)."""
    hd = x.shape[-1]
    out = x.clone()
    for j in range(hd // 2):
        a = pos * theta ** (-2.0 * j / hd)
        x1, x2 = x[..., j], x[..., j + hd // 2]
        out[..., j] = x1 * math.cos(a) - x2 * math.sin(a)
        out[..., j + hd // 2] = x2 * math.cos(a) + x1 * math.sin(a)
    return out


def naive_mot(lm, x: torch.Tensor, pos: list[int], is_gen: list[bool], visible: torch.Tensor, mot=True):
    """Token-by-token MoT decoder: each token picks its expert's norms/projections/MLP/final norm;
    q/k head-norm then RoPE; one softmax attention over visible keys; K/V head j serves query
    heads j*g..j*g+g-1. With ``mot=False`` (MoE layers) only the MLP and the final norm are
    per expert."""
    cfg = lm.cfg
    nh, nkv, hd, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
    n = x.shape[0]
    x = x.clone()
    for layer in lm.layers:
        at = layer.self_attn

        def ex(name, gen, mod=at):
            return getattr(mod, name + ("_moe_gen" if gen and mot else ""))

        qs, ks, vs = [], [], []
        for i in range(n):
            g = is_gen[i]
            h = _rms(x[i], ex("input_layernorm", g, layer).weight, eps)
            q = ex("q_proj", g)(h).view(nh, hd)
            k = ex("k_proj", g)(h).view(nkv, hd)
            v = ex("v_proj", g)(h).view(nkv, hd)
            q = _rms(q, ex("q_norm", g).weight, eps)  # per head, before RoPE
            k = _rms(k, ex("k_norm", g).weight, eps)
            qs.append(_rope_one(q, pos[i], cfg.rope_theta))
            ks.append(_rope_one(k, pos[i], cfg.rope_theta))
            vs.append(v)
        new = []
        for i in range(n):
            g = is_gen[i]
            heads = []
            for hq in range(nh):
                kv = hq // (nh // nkv)
                keys = [j for j in range(n) if visible[i, j]]
                s = torch.stack([qs[i][hq] @ ks[j][kv] for j in keys]) / math.sqrt(hd)
                p = s.softmax(0)
                heads.append(sum(p[m] * vs[j][kv] for m, j in enumerate(keys)))
            o = ex("o_proj", g)(torch.cat(heads))
            y = x[i] + o
            mlp = layer.mlp_moe_gen if g else layer.mlp
            y = y + mlp(_rms(y, ex("post_attention_layernorm", g, layer).weight, eps))
            new.append(y)
        x = torch.stack(new)
    return torch.stack([_rms(x[i], (lm.norm_moe_gen if is_gen[i] else lm.norm).weight, eps) for i in range(n)])


def _distinct_experts(model) -> None:
    """Random, different weights for every tensor (incl. norms), so a wrong expert shows."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.language_model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif "embed_tokens" not in name and "lm_head" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_mot_routing_qknorm_rope_and_final_norm_match_token_by_token_reference():
    """Checklist 9 + 10: markers -> und expert, every latent (clean or noised) -> gen expert,
    including input/post norms, q/k norms, o_proj and the final norm; q/k norm before RoPE."""
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    _distinct_experts(model)
    # text(3 ids) | clean VAE 2 latents | noised VAE 2 latents
    splits, modes = [5, 4, 4], ["causal", "full", "noise"]
    layout = PackedLayout.from_splits([13], splits, modes)
    pos = [0, 1, 2, 3, 4] + [5] * 4 + [6] * 4
    is_gen = [False] * 5 + [False, True, True, False] * 2
    x = torch.randn(13, cfg.llm.hidden_size, generator=torch.Generator().manual_seed(1))
    gen_idx = torch.tensor([i for i, g in enumerate(is_gen) if g])
    with torch.no_grad():
        got = model.language_model.model(
            x,
            torch.tensor(pos),
            Routing.from_gen_indexes(gen_idx, 13),
            lambda _i, q, k, v: packed_attention(q, k, v, layout),
        )
        want = naive_mot(model.language_model.model, x, pos, is_gen, dense_mask(layout))
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_moe_variant_duplicates_only_the_mlp():
    cfg = preset("tiny")
    cfg.llm.layer_module = "Qwen2MoEDecoderLayer"
    torch.manual_seed(0)
    model = build_model(cfg)
    _distinct_experts(model)
    layout = PackedLayout.from_splits([8], [4, 4], ["causal", "noise"])
    pos = [0, 1, 2, 3] + [4] * 4
    is_gen = [False] * 5 + [True, True, False]
    x = torch.randn(8, cfg.llm.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model.language_model.model(
            x,
            torch.tensor(pos),
            Routing.from_gen_indexes(torch.tensor([5, 6]), 8),
            lambda _i, q, k, v: packed_attention(q, k, v, layout),
        )
        want = naive_mot(model.language_model.model, x, pos, is_gen, dense_mask(layout), mot=False)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_vit_tokens_are_connector_of_post_ln_features_plus_table():
    """Checklist 6 (ViT side): connector(SigLIP(patches)) + vit_pos_embed[row*70 + col]; the
    SigLIP output is post_layernorm of the last built layer; pixels normalised with 0.5 / 0.5."""
    from bagel_core.data.transforms import ImageTransform

    t = ImageTransform(980, 224, 14)
    assert t.args.image_mean == t.args.image_std == (0.5, 0.5, 0.5)
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = grid_position_ids(2, 3, 70)
    assert ids.tolist() == [0, 1, 2, 70, 71, 72]
    patches = torch.randn(6, 588)
    vm = model.vit_model.vision_model
    with torch.no_grad():
        x = vm.embeddings.patch_embedding(patches) + vm.embeddings.position_embedding.weight[ids]
        for layer in vm.encoder.layers:
            x = layer(x, PackedLayout.documents([6], "full"), "sdpa")
        want = model.connector(vm.post_layernorm(x)) + model.vit_pos_embed.pos_embed[ids]
        torch.testing.assert_close(model.embed_vit(patches, ids, [6]), want)


def test_training_forward_routes_vae_latents_not_markers_to_gen_expert():
    """The packed forward's routing = packed_vae_token_indexes (markers live in the text ids)."""
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = make_packed_batch(cfg, [[("text", 3, False), ("vae", 1, 2, False), ("vae", 2, 1, True)]])
    seen = {}

    def hook(_m, args, _out):
        seen["gen_rows"] = args[0].shape[0]

    model.language_model.model.layers[0].input_layernorm_moe_gen.register_forward_hook(hook)
    with torch.no_grad():
        model(**batch, noise_generator=torch.Generator().manual_seed(0))
    assert seen["gen_rows"] == 4  # 2 clean + 2 noised latents; the 4 markers are und
    vae_idx = set(batch["packed_vae_token_indexes"].tolist())
    marker_pos = {5, 8, 9, 12}
    assert not (vae_idx & marker_pos) and marker_pos <= set(batch["packed_text_indexes"].tolist())


def test_gen_mode_qk_norm_and_rope_run_in_fp32_for_bf16_weights():
    """inference.md 13: in mode "gen" q/k enter the head norms as fp32 and RoPE runs in fp32; the
    cached keys are cast back to the hidden dtype. Mode "und" stays in the hidden dtype."""
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = build_model(cfg).to(torch.bfloat16).eval()
    attn = model.language_model.model.layers[0].self_attn
    dtypes: dict[str, list[torch.dtype]] = {"q_norm": [], "q_norm_moe_gen": [], "k_norm_moe_gen": []}
    for name in dtypes:
        getattr(attn, name).register_forward_hook(lambda _m, a, o, n=name: dtypes[n].append(o.dtype))
    cache = model.new_cache()
    text = model.embed_text(torch.tensor([1, 2, 3]))
    with torch.no_grad():
        model.forward_cached(text, torch.arange(3), Routing.all_und(3), cache, True, True)
        assert dtypes["q_norm"] == [torch.bfloat16]
        emb = torch.randn(4, cfg.llm.hidden_size, dtype=torch.bfloat16)
        route = Routing.from_gen_indexes(torch.tensor([1, 2]), 4, qk_fp32=True)
        out = model.forward_cached(emb, torch.full((4,), 3), route, cache, False, True)
    assert dtypes["q_norm"][1:] == [torch.float32]  # the markers, und expert, also fp32
    assert dtypes["q_norm_moe_gen"] == dtypes["k_norm_moe_gen"] == [torch.float32]
    assert out.dtype == torch.bfloat16
    assert cache.keys[0].dtype == cache.values[0].dtype == torch.bfloat16
    assert cache.length == 7
    # In fp32 the flag changes nothing.
    model32 = build_model(cfg).eval()
    emb32 = emb.float()
    with torch.no_grad():
        a = model32.forward_cached(emb32, torch.full((4,), 3), route, model32.new_cache(), False, False)
        route_plain = Routing.from_gen_indexes(torch.tensor([1, 2]), 4)
        b = model32.forward_cached(emb32, torch.full((4,), 3), route_plain, model32.new_cache(), False, False)
    assert torch.equal(a, b)


# ---------------------------------------------------------------- tables, time, adapters (model.md 5)


def test_sincos_table_column_half_first_and_independent_of_side():
    """Checklist 6: [sin(j w) | cos(j w) | sin(i w) | cos(i w)], w_k = 10000^(-k/(D/4))."""
    d = 12
    t64, t32 = sincos_2d_table(64, d), sincos_2d_table(32, d)
    i, j = 5, 17
    q = d // 4
    w = [10000 ** (-k / q) for k in range(q)]
    want = (
        [math.sin(j * x) for x in w]
        + [math.cos(j * x) for x in w]
        + [math.sin(i * x) for x in w]
        + [math.cos(i * x) for x in w]
    )
    assert t64[i * 64 + j].tolist() == pytest.approx(want, abs=1e-12)
    assert t64[i * 64 + j].tolist() == pytest.approx(t32[i * 32 + j].tolist(), abs=1e-12)
    # row 0 = all-zero position: sin blocks 0, cos blocks 1
    assert t64[0].tolist() == [0.0] * q + [1.0] * q + [0.0] * q + [1.0] * q


def test_model_tables_are_frozen_fp32_parameters_of_the_right_side():
    cfg = preset("tiny")
    model = build_model(cfg)
    lat, vit = model.latent_pos_embed.pos_embed, model.vit_pos_embed.pos_embed
    assert lat.shape == (64 * 64, cfg.llm.hidden_size) and vit.shape == (70 * 70, cfg.llm.hidden_size)
    assert lat.dtype == vit.dtype == torch.float32
    assert not lat.requires_grad and not vit.requires_grad
    sd = model.state_dict()
    assert "latent_pos_embed.pos_embed" in sd and "vit_pos_embed.pos_embed" in sd  # checklist 12
    want = torch.from_numpy(sincos_2d_table(64, cfg.llm.hidden_size)).float()
    assert torch.equal(lat, want)


def test_timestep_embedder_features_cos_first_unscaled_t():
    """Checklist 7: 256 features, f_k = exp(-ln(1e4) k / 128), [cos(t f) | sin(t f)], t in [0, 1]."""
    t = torch.tensor([0.0, 0.25, 1.0])
    feats = TimestepEmbedder.features(t, 256)
    assert feats.shape == (3, 256) and feats.dtype == torch.float32
    k = torch.arange(128, dtype=torch.float64)
    f = torch.exp(-math.log(10000.0) * k / 128)
    for row, tv in zip(feats, t.tolist()):
        torch.testing.assert_close(row[:128].double(), torch.cos(tv * f), atol=1e-6, rtol=0)
        torch.testing.assert_close(row[128:].double(), torch.sin(tv * f), atol=1e-6, rtol=0)
    assert feats[0, :128].eq(1).all() and feats[0, 128:].eq(0).all()
    emb = TimestepEmbedder(8)
    assert [k for k in emb.state_dict()] == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"]
    assert isinstance(emb.mlp[1], torch.nn.SiLU)
    with torch.no_grad():
        want = emb.mlp[2](F.silu(emb.mlp[0](feats)))
        torch.testing.assert_close(emb(t), want)


def test_fresh_model_llm2vae_is_zero_and_connector_is_gelu_tanh():
    from transformers.activations import ACT2FN

    cfg = preset("tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    assert not model.llm2vae.weight.any() and not model.llm2vae.bias.any()
    assert model.vae2llm.weight.any()
    assert not model.language_model.cfg.tie_word_embeddings
    lm = model.language_model
    assert lm.lm_head.weight.data_ptr() != lm.model.embed_tokens.weight.data_ptr()
    x = torch.randn(5, cfg.vit.hidden_size)
    c = model.connector
    with torch.no_grad():
        want = c.fc2(ACT2FN["gelu_pytorch_tanh"](c.fc1(x)))
        torch.testing.assert_close(c(x), want)


def test_latent_embedding_is_vae2llm_plus_time_plus_table_row():
    """model.md 5.3 with 2-D ids row*64 + col (checklist 5)."""
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = grid_position_ids(2, 3, 64)
    assert ids.tolist() == [0, 1, 2, 64, 65, 66]
    x = torch.randn(6, 64)
    t = torch.full((6,), 0.3)
    with torch.no_grad():
        got = model.embed_latents(x, t, ids)
        want = model.vae2llm(x) + model.time_embedder(t) + model.latent_pos_embed.pos_embed[ids]
    torch.testing.assert_close(got, want)


def test_interpolated_ids_bucket_fractional_coordinates():
    """data-format.md 9.2: bucket = #boundaries among 1/M..(M-1)/M that are <= k/R."""
    m = 4
    ids = interpolated_position_ids(2, 3, m)

    def bucket(k, n):
        return sum(1 for b in range(1, m) if b / m <= k / n)

    want = [bucket(r, 2) * m + bucket(c, 3) for r in range(2) for c in range(3)]
    assert ids.tolist() == want == [0, 1, 2, 8, 9, 10]
    # Coordinates are fp32 arange values as upstream: 15/25 is 0.59999996 < 42/70, bucket 41.
    ids = interpolated_position_ids(25, 1, 70)
    assert ids.shape == (25,) and ids[15].item() == 41 * 70 and ids[16].item() == 44 * 70
    assert interpolated_position_ids(70, 70, 70).tolist() == list(range(4900))  # identity at n = M


# ---------------------------------------------------------------- flow matching (model.md 6, training.md 4.1)


def test_training_flow_inputs_and_mse_target_follow_the_reference():
    """Checklist 8: t = shift(sigmoid(tau)), x_t = (1-t) x0 + t eps, target eps - x0 on noised rows
    only, clean latents get t = 0 (still time-embedded) and are excluded from the loss."""
    cfg = preset("tiny")
    cfg.timestep_shift = 2.0
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        model.llm2vae.bias.copy_(torch.linspace(-1, 1, 64))  # pred = bias (weight is zero)
    samples = [[("vae", 1, 2, False), ("text", 2, False), ("vae", 2, 2, True), ("text", 2, True)]]
    batch = make_packed_batch(cfg, samples, seed=4)
    captured = {}

    def keep(name):
        def hook(_m, args, _out):
            captured[name] = args[0].clone()

        return hook

    model.vae2llm.register_forward_hook(keep("x_t"))
    model.time_embedder.register_forward_hook(keep("t"))
    with torch.no_grad():
        out = model(**batch, noise_generator=torch.Generator().manual_seed(9))
    # x0: crop each latent to (2h, 2w), 2x2 patches, channel fastest (checklist 4)
    x0 = torch.cat(
        [
            patchify(lat[:, : 2 * h, : 2 * w], 2)
            for lat, (h, w) in zip(batch["padded_latent"], batch["patchified_vae_latent_shapes"])
        ]
    )
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9))
    tau = batch["packed_timesteps"]
    s = torch.sigmoid(tau)
    t = 2.0 * s / (1 + s)
    assert t[:2].eq(0).all() and (t[2:] > 0).all()
    torch.testing.assert_close(captured["t"], t)
    torch.testing.assert_close(captured["x_t"], (1 - t[:, None]) * x0 + t[:, None] * eps)
    pred = model.llm2vae.bias.detach()
    target = (eps - x0)[2:]
    torch.testing.assert_close(out.mse, (pred - target) ** 2)
    assert out.mse.shape == (4, 64)


def test_ce_uses_lm_head_at_loss_indexes_with_next_token_labels():
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = make_packed_batch(cfg, [[("text", 3, False), ("text", 4, True)]])
    # labels of the loss span: its 4 ids then <|im_end|>, predicted from <|im_start|> and the ids
    ids = batch["packed_text_ids"].tolist()
    assert batch["ce_loss_indexes"].tolist() == [5, 6, 7, 8, 9]
    assert batch["packed_label_ids"].tolist() == ids[6:11]
    hidden = {}

    def keep(_m, _a, out):
        hidden["h"] = out

    model.language_model.model.norm.register_forward_hook(keep)
    with torch.no_grad():
        out = model(**batch)
        logits = model.language_model.lm_head(hidden["h"][batch["ce_loss_indexes"]])
    want = F.cross_entropy(logits.float(), batch["packed_label_ids"], reduction="none")
    torch.testing.assert_close(out.ce, want)
    assert out.mse is None


def test_shift_formula():
    t = torch.tensor([0.0, 0.2, 0.5, 1.0])
    for s in (1.0, 3.0):
        torch.testing.assert_close(shift_timesteps(t, s), s * t / (1 + (s - 1) * t))


# ---------------------------------------------------------------- VAE (model.md 8, checklist 13)


def test_vae_latent_scale_shift_direction_and_posterior_sampling():
    vae = AutoEncoder(VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)).eval()
    assert (vae.cfg.scale_factor, vae.cfg.shift_factor, vae.cfg.z_channels) == (0.3611, 0.1159, 16)
    mean = torch.randn(1, 16, 2, 3, generator=torch.Generator().manual_seed(0))

    def moments(logvar: float):
        return lambda x: torch.cat([mean, torch.full_like(mean, logvar)], 1)

    x = torch.zeros(1, 3, 16, 24)
    vae.encoder.forward = moments(0.0)
    z = vae.encode(x, generator=torch.Generator().manual_seed(5))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(z, 0.3611 * (mean + eps - 0.1159))  # samples, never the mean
    vae.encoder.forward = moments(-200.0)  # std -> 0: the affine map alone
    torch.testing.assert_close(vae.encode(x), 0.3611 * (mean - 0.1159))
    seen = {}

    def decoder(z_in):
        seen["z"] = z_in
        return z_in

    vae.decoder.forward = decoder
    vae.decode(z)
    torch.testing.assert_close(seen["z"], z / 0.3611 + 0.1159)


def test_vae_geometry_factor_8_and_16_latent_channels():
    vae = AutoEncoder(VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)).eval()
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 32, 48))
        assert z.shape == (1, 16, 4, 6)
        assert vae.decode(z).shape == (1, 3, 32, 48)
    assert vae.encoder.conv_out.out_channels == 32  # mean and log-variance


def test_flux_vae_full_key_table():
    """Every tensor of FLUX's ae.safetensors as model.md 8 describes it (244 tensors)."""
    with torch.device("meta"):
        vae = AutoEncoder()
    sd = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    want: dict[str, tuple[int, ...]] = {}

    def conv(name, cin, cout, k):
        want[name + ".weight"], want[name + ".bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        want[name + ".weight"] = want[name + ".bias"] = (c,)

    def res(name, cin, cout):
        norm(name + ".norm1", cin)
        conv(name + ".conv1", cin, cout, 3)
        norm(name + ".norm2", cout)
        conv(name + ".conv2", cout, cout, 3)
        if cin != cout:
            conv(name + ".nin_shortcut", cin, cout, 1)

    def mid(p, c):
        res(p + ".mid.block_1", c, c)
        norm(p + ".mid.attn_1.norm", c)
        for n in ("q", "k", "v", "proj_out"):
            conv(f"{p}.mid.attn_1.{n}", c, c, 1)
        res(p + ".mid.block_2", c, c)

    chans = [128, 256, 512, 512]
    conv("encoder.conv_in", 3, 128, 3)
    cin = 128
    for i, c in enumerate(chans):
        for j in range(2):
            res(f"encoder.down.{i}.block.{j}", cin, c)
            cin = c
        if i < 3:
            conv(f"encoder.down.{i}.downsample.conv", c, c, 3)
    mid("encoder", 512)
    norm("encoder.norm_out", 512)
    conv("encoder.conv_out", 512, 32, 3)
    conv("decoder.conv_in", 16, 512, 3)
    mid("decoder", 512)
    cin = 512
    for i in (3, 2, 1, 0):
        for j in range(3):
            res(f"decoder.up.{i}.block.{j}", cin, chans[i])
            cin = chans[i]
        if i > 0:
            conv(f"decoder.up.{i}.upsample.conv", cin, cin, 3)
    norm("decoder.norm_out", 128)
    conv("decoder.conv_out", 128, 3, 3)
    assert len(want) == 244
    assert sd == want


# ---------------------------------------------------------------- release configs (model.md 2, 9)


def test_release_json_configs_give_the_7b_mot_model(tmp_path):
    """Checklist 1, 2, 11: 27-layer vit_config -> 26 built; forced qk_norm / untied / MoT; the
    152,064-row vocabulary; no bagel_config.json -> release constants (max_latent_size 64)."""
    llm = {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": 3584,
        "initializer_range": 0.02,
        "intermediate_size": 18944,
        "max_position_embeddings": 32768,
        "max_window_layers": 28,
        "model_type": "qwen2",
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": True,  # overridden in code, whatever the JSON says
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 152064,
    }
    vit = {
        "hidden_size": 1152,
        "image_size": 980,
        "intermediate_size": 4304,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-06,
        "rope": True,  # overridden in code: the learned 4900-row table is kept
    }
    (tmp_path / "llm_config.json").write_text(json.dumps(llm))
    (tmp_path / "vit_config.json").write_text(json.dumps(vit))
    cfg = read_config(tmp_path)
    assert cfg == preset("7b-mot")
    assert cfg.vit.num_hidden_layers == 26 and cfg.max_latent_size == 64
    assert cfg.llm.qk_norm and not cfg.llm.tie_word_embeddings
    assert cfg.llm.layer_module == "Qwen2MoTDecoderLayer"
    model = build_model(cfg, "meta")
    assert len(model.vit_model.vision_model.encoder.layers) == 26
    assert model.vit_model.vision_model.embeddings.position_embedding.weight.shape == (4900, 1152)
    assert model.language_model.model.embed_tokens.weight.shape[0] == 152064
    assert not any("rotary" in k or "inv_freq" in k for k in model.state_dict())


def test_fp32_training_checkpoint_loads_cast_to_bf16(tmp_path):
    """model.md 9.2: training writes fp32 files; inference casts every tensor to bf16 on load."""
    from safetensors import safe_open

    from bagel_core.model import load_model_dir, save_model_dir

    cfg = preset("tiny")
    torch.manual_seed(2)
    model = build_model(cfg)
    save_model_dir(tmp_path, model, dtype=None)
    with safe_open(str(tmp_path / "ema.safetensors"), framework="pt") as f:
        assert f.get_slice("vae2llm.weight").get_dtype() == "F32"
    loaded = load_model_dir(tmp_path, dtype=torch.bfloat16)
    want = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    for k, v in got.items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, want[k].to(torch.bfloat16)), k
    assert not loaded.latent_pos_embed.pos_embed.requires_grad
