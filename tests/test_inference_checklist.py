"""inference.md section 15 (parity checklist), item by item, on a tiny in-memory model.

The denoising loop is checked with a scripted velocity (so schedule, CFG interval, branch calls,
renorm and the Euler direction are compared with a hand computation), the contexts with their
KV lengths and RoPE counters against the worked examples, and the text loop with a scripted
``lm_head``.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from bagel_core.data.tokenizer import load_tokenizer
from bagel_core.data.transforms import ImageTransform
from bagel_core.inference import Inferencer, cfg_active, cfg_combine, flow_timesteps
from bagel_core.inference import inferencer as inferencer_mod
from bagel_core.inference.inferencer import GEN_THINK_SYSTEM_PROMPT, Guidance, latents_to_image
from bagel_core.model import AutoEncoder, build_model, preset
from bagel_core.sequence.grid import unpatchify


@pytest.fixture(scope="module")
def inf():
    cfg = preset("tiny")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.llm2vae.weight.normal_(0, 0.02)
    vae = AutoEncoder(cfg.vae).eval()
    tokenizer, ids = load_tokenizer()
    return Inferencer(
        model,
        vae,
        tokenizer,
        ids.as_dict(),
        vae_transform=ImageTransform(64, 32, 16),
        vit_transform=ImageTransform(56, 28, 14),
    )


def _n(inf, text: str) -> int:
    return len(inf.tokenizer.encode(text, add_special_tokens=False))


# ---------------------------------------------------------------- schedule and interval


def test_interval_is_tested_on_fp32_shifted_t_with_strict_lower_bound():
    # shift 1, 6 points: t_3 = fp32(0.4) = 0.40000000596 > 0.4 in float64, but upstream compares
    # the fp32 tensor with 0.4 rounded to fp32: not active.
    ts = flow_timesteps(6, 1.0)
    assert float(ts[3]) != 0.4 and ts[3] == torch.tensor(0.4)
    assert not cfg_active(ts[3], (0.4, 1.0))
    assert cfg_active(ts[2], (0.4, 1.0)) and cfg_active(ts[0], (0.4, 1.0))
    assert not cfg_active(torch.tensor(0.0), (0.0, 1.0))  # t = 0 is never in (0, 1]
    ts = flow_timesteps(50, 3.0)
    assert sum(cfg_active(t, (0.4, 1.0)) for t in ts[:-1]) == 41
    assert sum(cfg_active(t, (0.0, 1.0)) for t in ts[:-1]) == 49


def _script_velocity(monkeypatch, inf, vel: dict[str, torch.Tensor], names: dict[int, str]):
    calls: list[tuple[str, float, torch.Tensor]] = []

    def fake(ctx, x, t, rows, cols):
        name = names[id(ctx)]
        calls.append((name, t, x.clone()))
        return vel[name].clone()

    monkeypatch.setattr(inf, "velocity", fake)
    out = {}

    def capture(_vae, x, rows, cols, patch):
        out["x"], out["shape"] = x, (rows, cols)
        return Image.new("RGB", (cols * 16, rows * 16))

    monkeypatch.setattr(inferencer_mod, "latents_to_image", capture)
    return calls, out


@pytest.mark.parametrize("renorm", ["global", "text_channel"])
def test_denoise_schedule_branches_cfg_and_euler_direction(inf, monkeypatch, renorm):
    """49 evaluations for n = 50, CFG on the first 41 (t > 0.4), three branches while active and
    only the conditional one after, x <- x - v dt from noise drawn as randn(N, 64) on the CPU."""
    g = torch.Generator().manual_seed(1)
    vel = {k: torch.randn(6, 64, generator=g) for k in ("gen", "text", "img")}
    gen, cfg_text, cfg_img = inf.new_context(), inf.new_context(), inf.new_context()
    names = {id(gen): "gen", id(cfg_text): "text", id(cfg_img): "img"}
    calls, out = _script_velocity(monkeypatch, inf, vel, names)
    inf.denoise(
        gen,
        cfg_text,
        cfg_img,
        32,
        48,
        torch.Generator().manual_seed(7),
        Guidance(
            cfg_text_scale=4.0,
            cfg_img_scale=1.5,
            cfg_interval=(0.4, 1.0),
            cfg_renorm_min=0.0,
            cfg_renorm_type=renorm,
            timestep_shift=3.0,
            num_timesteps=50,
        ),
    )
    by = {k: [t for n, t, _ in calls if n == k] for k in ("gen", "text", "img")}
    assert len(by["gen"]) == 49 and len(by["text"]) == len(by["img"]) == 41
    assert by["gen"][:3] == pytest.approx([1.0, 0.9931, 0.98601], abs=1e-4)
    assert by["gen"][-1] == pytest.approx(0.05882, abs=1e-4)
    assert min(by["text"]) > 0.4
    # hand computation, float64
    c, ut, ui = (vel[k].double() for k in ("gen", "text", "img"))
    gt = ut + 4.0 * (c - ut)
    if renorm == "global":
        gg = ui + 1.5 * (gt - ui)
        v_cfg = gg * min(1.0, float(c.norm() / (gg.norm() + 1e-8)))
    else:
        k = (c.norm(dim=-1, keepdim=True) / (gt.norm(dim=-1, keepdim=True) + 1e-8)).clamp(max=1.0)
        v_cfg = ui + 1.5 * (gt * k - ui)
    ts = flow_timesteps(50, 3.0).double()
    dt = ts[:-1] - ts[1:]
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(7)).double()  # 2 x 3 tokens
    assert torch.equal(calls[0][2], x.float())
    x = x - v_cfg * dt[:41].sum() - c * dt[41:].sum()
    assert out["shape"] == (2, 3)
    torch.testing.assert_close(out["x"].double(), x, atol=1e-5, rtol=1e-5)


def test_no_text_guidance_means_no_extra_branches(inf, monkeypatch):
    """Image guidance has no effect (and no branch) unless the text scale is above 1."""
    vel = {k: torch.randn(2, 64) for k in ("gen", "text", "img")}
    gen, cfg_text, cfg_img = inf.new_context(), inf.new_context(), inf.new_context()
    names = {id(gen): "gen", id(cfg_text): "text", id(cfg_img): "img"}
    calls, out = _script_velocity(monkeypatch, inf, vel, names)
    inf.denoise(
        gen,
        cfg_text,
        cfg_img,
        16,
        32,
        torch.Generator().manual_seed(0),
        Guidance(
            cfg_text_scale=1.0,
            cfg_img_scale=2.0,
            cfg_interval=(0.0, 1.0),
            cfg_renorm_min=0.0,
            cfg_renorm_type="global",
            timestep_shift=1.0,
            num_timesteps=5,
        ),
    )
    assert [n for n, _, _ in calls] == ["gen"] * 4
    x0 = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["x"], x0 - vel["gen"])  # sum of dt = 1


def test_cfg_combine_formulas_and_dtypes():
    g = torch.Generator().manual_seed(0)
    c, ut, ui = (torch.randn(5, 64, generator=g) for _ in range(3))
    # channel: per-token clamp after both terms
    raw = ui + 2.0 * ((ut + 3.0 * (c - ut)) - ui)
    k = (c.norm(dim=-1, keepdim=True) / (raw.norm(dim=-1, keepdim=True) + 1e-8)).clamp(0.5, 1.0)
    torch.testing.assert_close(cfg_combine(c, ut, ui, 3.0, 2.0, "channel", 0.5), k * raw)
    # text_channel: no renorm after the image term
    gt = ut + 3.0 * (c - ut)
    k = (c.norm(dim=-1, keepdim=True) / (gt.norm(dim=-1, keepdim=True) + 1e-8)).clamp(0.0, 1.0)
    torch.testing.assert_close(cfg_combine(c, ut, ui, 3.0, 2.0, "text_channel"), ui + 2.0 * (k * gt - ui))
    torch.testing.assert_close(cfg_combine(c, ut, None, 3.0, 2.0, "text_channel"), k * gt)
    # bf16 velocities: global keeps bf16 (0-dim fp32 factor), per-token factors promote to fp32
    cb, utb, uib = (t.bfloat16() for t in (c, ut, ui))
    assert cfg_combine(cb, utb, uib, 4.0, 1.5, "global").dtype == torch.bfloat16
    assert cfg_combine(cb, utb, uib, 4.0, 1.5, "channel").dtype == torch.float32
    assert cfg_combine(cb, utb, uib, 4.0, 1.5, "text_channel").dtype == torch.float32
    with pytest.raises(ValueError, match="unknown cfg_renorm_type 'local'"):
        cfg_combine(c, ut, ui, 4.0, 1.5, "local")


# ---------------------------------------------------------------- contexts (inference.md 3, 7, 10)


def _capture_contexts(monkeypatch, inf):
    seen = {}

    def fake_denoise(gen, cfg_text, cfg_img, height, width, generator, *args):
        seen.update(gen=gen, cfg_text=cfg_text, cfg_img=cfg_img, size=(height, width), args=args)
        return Image.new("RGB", (width, height))

    monkeypatch.setattr(inf, "denoise", fake_denoise)
    return seen


def test_edit_contexts_vae_then_vit_snapshots_and_rope(inf, monkeypatch):
    """inference.md 10 example layout: gen = [VAE (RoPE 0), ViT (RoPE 1), text (2..)], cfg_text =
    [VAE, ViT], cfg_img = [text]; the query sits at each branch's own RoPE counter."""
    seen = _capture_contexts(monkeypatch, inf)
    lat, vit = {}, {}
    model = inf.model
    orig_lat, orig_vit = model.embed_latents, model.embed_vit
    order = []

    def embed_latents(x, t, ids):
        lat.update(ids=ids, t=t)
        order.append("vae")
        return orig_lat(x, t, ids)

    def embed_vit(patches, ids, seqlens):
        vit.update(ids=ids, seqlens=seqlens)
        order.append("vit")
        return orig_vit(patches, ids, seqlens)

    monkeypatch.setattr(model, "embed_latents", embed_latents)
    monkeypatch.setattr(model, "embed_vit", embed_vit)
    img = Image.new("RGB", (64, 48), (10, 200, 30))
    inf.edit(img, "make it blue", seed=3)
    n = _n(inf, "make it blue") + 2
    T, P = (48 // 16) * (64 // 16), vit["seqlens"][0]
    assert order == ["vae", "vit"]
    assert lat["t"].eq(0).all()  # clean context latents: t = 0
    assert lat["ids"].tolist() == [r * 64 + c for r in range(3) for c in range(4)]
    pix = inf.vit_transform(inf._prepare_image(img))
    vr, vc = pix.shape[1] // 14, pix.shape[2] // 14
    assert P == vr * vc and vr > 1 and vc > 1
    assert vit["ids"].tolist() == [r * 70 + c for r in range(vr) for c in range(vc)]  # stride 70
    gen, ct, ci = seen["gen"], seen["cfg_text"], seen["cfg_img"]
    assert (gen.cache.length, gen.rope) == (T + 2 + P + 2 + n, 2 + n)
    assert (ct.cache.length, ct.rope) == (T + 2 + P + 2, 2)
    assert (ci.cache.length, ci.rope) == (n, n)
    assert seen["size"] == (48, 64)  # output = VAE-resized input size


def test_edit_draws_posterior_noise_before_initial_noise(inf, monkeypatch):
    """inference.md 12: one CPU stream, the VAE posterior eps first, then randn(N, 64)."""
    vel = {"gen": torch.zeros(12, 64), "text": torch.zeros(12, 64), "img": torch.zeros(12, 64)}
    names = {}
    captured = []
    orig_encode = inf.vae.encode

    def encode(x, generator=None):
        out = orig_encode(x, generator=generator)
        captured.append(out.shape)
        return out

    monkeypatch.setattr(inf.vae, "encode", encode)

    def fake(ctx, x, t, rows, cols):
        names.setdefault("x0", x.clone())
        return vel["gen"]

    monkeypatch.setattr(inf, "velocity", fake)
    monkeypatch.setattr(inferencer_mod, "latents_to_image", lambda *a: Image.new("RGB", (64, 48)))
    inf.edit(Image.new("RGB", (64, 48)), "x", seed=11, num_timesteps=2)
    g = torch.Generator().manual_seed(11)
    torch.randn(captured[0], generator=g)  # posterior eps (1, 16, H/8, W/8)
    want = torch.randn(12, 64, generator=g)
    assert torch.equal(names["x0"], want)


def test_t2i_contexts_with_and_without_think(inf, monkeypatch):
    """inference.md 7 table: T2I gen = [text], cfg_text = [] (query at RoPE 0), cfg_img = [text];
    with think: [SYS, text, think] / [SYS] / [SYS, text]."""
    seen = _capture_contexts(monkeypatch, inf)
    inf.generate("a red cube", height=32, width=16)
    n = _n(inf, "a red cube") + 2
    assert (seen["gen"].cache.length, seen["gen"].rope) == (n, n)
    assert (seen["cfg_text"].cache.length, seen["cfg_text"].rope) == (0, 0)
    assert (seen["cfg_img"].cache.length, seen["cfg_img"].rope) == (n, n)
    assert seen["size"] == (32, 16)
    monkeypatch.setattr(inf, "decode_text", lambda ctx, max_length, *a, **k: " plan")
    inf.generate("a red cube", height=32, width=16, think=True)
    s = _n(inf, GEN_THINK_SYSTEM_PROMPT) + 2
    p = _n(inf, " plan") + 2
    assert seen["gen"].rope == s + n + p
    assert seen["cfg_text"].rope == s
    assert seen["cfg_img"].rope == s + n


def test_understanding_context_vit_only_then_question(inf, monkeypatch):
    """inference.md 5: [ViT image (RoPE 0), question]; decoding starts at RoPE 1 + n."""
    seen = {}

    def fake_decode(ctx, max_length, do_sample, temperature, generator):
        seen.update(rope=ctx.rope, kv=ctx.cache.length, max_length=max_length)
        return "ok"

    monkeypatch.setattr(inf, "decode_text", fake_decode)
    monkeypatch.setattr(inf, "push_vae_image", lambda *a, **k: pytest.fail("no VAE item for understanding"))
    assert inf.understand(Image.new("RGB", (60, 40)), "what?", max_new_tokens=7) == "ok"
    n = _n(inf, "what?") + 2
    vit = inf.vit_transform(inf._prepare_image(Image.new("RGB", (60, 40))))
    P = (vit.shape[1] // 14) * (vit.shape[2] // 14)
    assert seen == {"rope": 1 + n, "kv": P + 2 + n, "max_length": 7}


def test_generated_image_advances_nothing(inf):
    ctx = inf.new_context()
    inf.push_text(ctx, "hi")
    before = (ctx.rope, ctx.cache.length, [k.shape for k in ctx.cache.keys])
    inf.velocity(ctx, torch.randn(2, 64), 0.5, 1, 2)
    assert (ctx.rope, ctx.cache.length, [k.shape for k in ctx.cache.keys]) == before


def test_release_resize_chain_for_understanding_and_edit():
    """inference.md 4 table rows: VAE rule first, the ViT rule on the VAE-resized picture."""
    vae_t, vit_t = ImageTransform(1024, 512, 16), ImageTransform(980, 224, 14)
    for (w, h), vae_size, vit_size in [
        ((640, 480), (688, 512), (686, 518)),
        ((256, 256), (512, 512), (518, 518)),
        ((800, 600), (800, 608), (798, 602)),
    ]:
        resized = vae_t.resize(Image.new("RGB", (w, h)))
        assert resized.size == vae_size
        assert tuple(vit_t(resized).shape[1:][::-1]) == vit_size


# ---------------------------------------------------------------- latents -> image, text decoding


def test_latents_to_image_unpatchify_order_and_truncation(inf, monkeypatch):
    seen = {}

    def decode(z):
        seen["z"] = z
        return torch.full((1, 3, 32, 64), (100.7 / 255 - 0.5) / 0.5)  # -> 100.7 before the cast

    monkeypatch.setattr(inf.vae, "decode", decode)
    x = torch.arange(2 * 4 * 64, dtype=torch.float32).reshape(8, 64)
    img = latents_to_image(inf.vae, x, 2, 4, 2)
    z = seen["z"][0]
    assert z.shape == (16, 4, 8)
    # token (r, c) holds latent pixels (2r + i, 2c + j), channel fastest
    r, c, i, j, ch = 1, 2, 1, 0, 5
    assert z[ch, 2 * r + i, 2 * c + j] == x[r * 4 + c, (i * 2 + j) * 16 + ch]
    assert torch.equal(z, unpatchify(x, 2, 4, 2, 16))
    assert img.size == (64, 32) and img.getpixel((0, 0)) == (100, 100, 100)  # truncated


class _ScriptedHead(torch.nn.Module):
    """Stands in for ``lm_head``: the n-th call puts the maximum on ``script[n]``."""

    def __init__(self, script: list[int], weight: torch.nn.Parameter) -> None:
        super().__init__()
        self.weight = weight  # the model reads its dtype/device from lm_head.weight
        self.script, self.vocab, self.step = script, weight.shape[0], 0

    def forward(self, h):
        logits = torch.zeros(self.vocab)
        logits[self.script[min(self.step, len(self.script) - 1)]] = 1.0
        self.step += 1
        return logits


def test_decode_loop_stops_and_truncates_like_upstream(inf):
    """inference.md 6: start token counts toward max_length; <|im_end|> stops and is dropped;
    a generated <|im_start|> truncates; whitespace kept."""
    tok = inf.tokenizer
    ids = tok.encode(" hello world", add_special_tokens=False)
    eos, bos = inf.ids["eos_token_id"], inf.ids["bos_token_id"]
    lm = inf.model.language_model
    ctx = inf.new_context()
    inf.push_text(ctx, "q")

    real_head = lm.lm_head

    def run(script, max_length):
        head = _ScriptedHead(script, real_head.weight)
        lm.lm_head = head
        try:
            return inf.decode_text(ctx, max_length=max_length), head.step
        finally:
            lm.lm_head = real_head

    assert run([*ids, eos], 100) == (" hello world", len(ids) + 1)
    assert run([*ids, eos], 2) == (tok.decode(ids[:1]), 2)  # start + 1 generated token
    assert run([ids[0], bos, *ids[1:], eos], 100)[0] == tok.decode(ids[:1])


def test_denoise_interval_edge_uses_fp32_comparison(inf, monkeypatch):
    """shift 1, 6 points: t = 1, .8, .6, fp32(.4), .2 -> CFG on the first three steps only."""
    vel = {k: torch.randn(1, 64) for k in ("gen", "text", "img")}
    gen, cfg_text, cfg_img = inf.new_context(), inf.new_context(), inf.new_context()
    names = {id(gen): "gen", id(cfg_text): "text", id(cfg_img): "img"}
    calls, _ = _script_velocity(monkeypatch, inf, vel, names)
    inf.denoise(
        gen,
        cfg_text,
        cfg_img,
        16,
        16,
        None,
        Guidance(
            cfg_text_scale=4.0,
            cfg_img_scale=1.5,
            cfg_interval=(0.4, 1.0),
            cfg_renorm_min=0.0,
            cfg_renorm_type="global",
            timestep_shift=1.0,
            num_timesteps=6,
        ),
    )
    assert [t for n, t, _ in calls if n == "text"] == pytest.approx([1.0, 0.8, 0.6])
    assert len([n for n, _, _ in calls if n == "gen"]) == 5


def test_image_chunks_route_markers_to_und_and_latents_to_gen(inf):
    """Mode "gen": <|vision_start|>/<|vision_end|> on the understanding expert, latents on the
    generation expert, fp32 q/k norm + RoPE (inference.md 3, 13)."""
    emb, route = inf._latent_query(torch.randn(6, 64), 0.5, 2, 3)
    assert emb.shape[0] == 8
    assert route.und.tolist() == [0, 7] and route.gen.tolist() == list(range(1, 7))
    assert route.qk_fp32
    marks = inf.model.embed_text(torch.tensor([inf.ids["start_of_image"], inf.ids["end_of_image"]]))
    assert torch.equal(emb[0], marks[0]) and torch.equal(emb[-1], marks[1])  # no time / position


# ---------------------------------------------------------------- upstream entry point (inference.md 1)


def test_call_puts_the_image_first_and_matches_edit(inf):
    img = Image.new("RGB", (40, 30), (200, 10, 10))
    kw = {"cfg_text_scale": 4.0, "cfg_img_scale": 2.0, "cfg_interval": (0.0, 1.0)}
    out = inf(text="make it green", image=img, cfg_renorm_type="text_channel", num_timesteps=3, seed=5, **kw)
    assert out["text"] is None and isinstance(out["image"], Image.Image)
    want = inf.edit(img, "make it green", num_timesteps=3, seed=5, **kw)
    assert out["image"].tobytes() == want.tobytes() and out["image"].size == want.size
    assert inf() == {"image": None, "text": None}


def test_interleave_defaults_t2i_and_understanding(inf, monkeypatch):
    seen = _capture_contexts(monkeypatch, inf)
    out = inf(text="a cat")
    assert isinstance(out["image"], Image.Image) and out["text"] is None
    assert seen["size"] == (1024, 1024)  # image_shapes default
    # text 3.0, image 1.5, interval (0.4, 1], renorm min 0 / global, shift 3, 50 steps
    assert seen["args"] == (Guidance(3.0, 1.5, (0.4, 1.0), 0.0, "global", 3.0, 50),)
    n = _n(inf, "a cat") + 2
    assert (seen["cfg_text"].rope, seen["cfg_img"].rope, seen["gen"].rope) == (0, n, n)

    calls = {}

    def fake_decode(ctx, max_length, do_sample, temperature, generator=None):
        calls.update(rope=ctx.rope, max_length=max_length, temperature=temperature)
        return "answer"

    monkeypatch.setattr(inf, "decode_text", fake_decode)
    monkeypatch.setattr(inf, "push_vae_image", lambda *a, **k: pytest.fail("no VAE item for understanding"))
    out = inf(image=Image.new("RGB", (30, 30)), text="why?", understanding_output=True, think=True)
    assert out == {"image": None, "text": "answer"}
    from bagel_core.inference.inferencer import VLM_THINK_SYSTEM_PROMPT

    s = _n(inf, VLM_THINK_SYSTEM_PROMPT) + 2
    assert calls == {"rope": s + 1 + _n(inf, "why?") + 2, "max_length": 1000, "temperature": 0.3}


def test_bf16_weights_edit_and_t2i_run_with_fp32_euler_state(inf, monkeypatch):
    """bf16 model (as loaded from the release), fp32 VAE on the CPU: editing (text_channel) and
    T2I (global) run; the Euler state stays fp32 while velocities are bf16."""
    model = build_model(preset("tiny")).to(torch.bfloat16).eval()
    with torch.no_grad():
        model.llm2vae.weight.normal_(0, 0.02)
    bf = Inferencer(model, inf.vae, inf.tokenizer, inf.ids, inf.vae_transform, inf.vit_transform)
    seen = []
    orig = bf.velocity

    def velocity(ctx, x, t, rows, cols):
        v = orig(ctx, x, t, rows, cols)
        seen.append((x.dtype, v.dtype))
        return v

    monkeypatch.setattr(bf, "velocity", velocity)
    img = Image.new("RGB", (40, 30), (0, 90, 200))
    a = bf.edit(img, "warmer", num_timesteps=3, seed=2)
    b = bf.edit(img, "warmer", num_timesteps=3, seed=2)
    assert a.tobytes() == b.tobytes()
    assert bf.generate("a cat", height=16, width=32, num_timesteps=2, seed=0).size == (32, 16)
    assert set(seen) == {(torch.float32, torch.bfloat16)}


def test_think_system_prompts_are_the_released_strings():
    """inference.md 11: two lines, the first ending with one space, no final newline."""
    from bagel_core.inference.inferencer import VLM_THINK_SYSTEM_PROMPT

    vlm = (
        "You should first think about the reasoning process in the mind and then provide the user "
        "with the answer. \nThe reasoning process is enclosed within <think> </think> tags, i.e. "
        "<think> reasoning process here </think> answer here"
    )
    gen = (
        "You should first think about the planning process in the mind and then generate the image. "
        "\nThe planning process is enclosed within <think> </think> tags, i.e. <think> planning "
        "process here </think> image here"
    )
    assert (VLM_THINK_SYSTEM_PROMPT, GEN_THINK_SYSTEM_PROMPT) == (vlm, gen)
    assert (len(vlm), len(gen)) == (227, 209)


def test_sampling_never_consumes_the_cpu_default_generator(inf):
    """inference.md 12: token sampling must stay off the CPU default generator (image noise)."""
    ctx = inf.new_context()
    inf.push_text(ctx, "hi")
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    inf.decode_text(ctx, max_length=3, do_sample=True, temperature=0.7)
    assert torch.equal(torch.random.get_rng_state(), state)
    g = torch.Generator().manual_seed(4)
    a = inf.decode_text(ctx, max_length=4, do_sample=True, temperature=0.7, generator=g)
    g2 = torch.Generator().manual_seed(4)
    b = inf.decode_text(ctx, max_length=4, do_sample=True, temperature=0.7, generator=g2)
    assert a == b


def test_interpolate_pos_config_is_honoured_at_inference(inf, monkeypatch):
    """With ``interpolate_pos`` the ViT and latent ids are bucketed (data-format.md 9.2), as in
    training; the release uses extrapolation (row * side + col)."""
    from bagel_core.sequence.grid import interpolated_position_ids

    monkeypatch.setattr(inf.model.cfg, "interpolate_pos", True)
    seen = {}
    orig = inf.model.embed_latents

    def embed_latents(x, t, ids):
        seen["ids"] = ids
        return orig(x, t, ids)

    monkeypatch.setattr(inf.model, "embed_latents", embed_latents)
    inf._latent_query(torch.randn(6, 64), 0.5, 2, 3)
    want = [0, 21, 42, 2048, 2069, 2090]
    assert seen["ids"].tolist() == interpolated_position_ids(2, 3, 64).tolist() == want
