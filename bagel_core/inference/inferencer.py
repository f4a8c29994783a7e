"""KV-cached BAGEL inference: text-to-image, understanding and editing (inference.md).

A *context* is a per-layer KV cache plus the next RoPE id. Items are prefilled in order: text is
causal on the understanding expert; a ViT image is one full-attention chunk (one RoPE id); a
clean VAE image is one full-attention chunk whose latents use the generation expert. An image
being generated is a query chunk run against up to three contexts (full / without text / without
images) per Euler step and combined by classifier-free guidance with norm clamping. Noise and VAE
posterior draws come from one CPU generator seeded per call, so outputs are deterministic for a
seed; token sampling uses its own generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from bagel_core.data.transforms import ImageTransform, to_rgb
from bagel_core.model.autoencoder import AutoEncoder
from bagel_core.model.bagel import Bagel, shift_timesteps
from bagel_core.model.qwen2_mot import KVCache, Routing
from bagel_core.sequence.grid import grid_position_ids, interpolated_position_ids, patchify, unpatchify

VLM_THINK_SYSTEM_PROMPT = (
    "You should first think about the reasoning process in the mind and then provide the user with the "
    "answer. \nThe reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning "
    "process here </think> answer here"
)
GEN_THINK_SYSTEM_PROMPT = (
    "You should first think about the planning process in the mind and then generate the image. \nThe "
    "planning process is enclosed within <think> </think> tags, i.e. <think> planning process here "
    "</think> image here"
)
RENORM_TYPES = ("global", "channel", "text_channel")


@dataclass(frozen=True)
class Guidance:
    """Settings of one denoising run (inference.md 8): CFG scales, interval, renorm and schedule."""

    cfg_text_scale: float
    cfg_img_scale: float
    cfg_interval: tuple[float, float]
    cfg_renorm_min: float
    cfg_renorm_type: str
    timestep_shift: float
    num_timesteps: int


@dataclass
class Context:
    """KV cache of the items pushed so far and the next RoPE id."""

    cache: KVCache
    rope: int = 0

    def copy(self) -> Context:
        return Context(self.cache.copy(), self.rope)


def cfg_combine(
    c: Tensor,
    u_text: Tensor | None,
    u_img: Tensor | None,
    text_scale: float,
    img_scale: float,
    renorm_type: str = "global",
    renorm_min: float = 0.0,
) -> Tensor:
    """Classifier-free guidance with CFG-renorm (inference.md 8, step 4); [N, 64] velocities.

    The arithmetic runs in the velocities' dtype and the norms in fp32, as upstream under bf16
    autocast: for ``global`` the factor is a 0-dim fp32 value, so a bf16 result stays bf16; the
    per-token factor of ``channel`` / ``text_channel`` promotes the result to fp32.
    """
    if text_scale <= 1.0 or u_text is None:
        return c
    if renorm_type not in RENORM_TYPES:
        raise ValueError(f"unknown cfg_renorm_type {renorm_type!r}; choose one of {RENORM_TYPES}")
    g = u_text + text_scale * (c - u_text)
    if renorm_type == "text_channel":
        g = _renorm_factor(c, g, renorm_min, per_token=True) * g
        if img_scale > 1.0 and u_img is not None:
            g = u_img + img_scale * (g - u_img)
        return g
    if img_scale > 1.0 and u_img is not None:
        g = u_img + img_scale * (g - u_img)
    return _renorm_factor(c, g, renorm_min, per_token=renorm_type == "channel") * g


def _renorm_factor(c: Tensor, g: Tensor, renorm_min: float, per_token: bool) -> Tensor:
    """clamp(|c| / (|g| + 1e-8), renorm_min, 1) with fp32 norms: Frobenius, or per token [N, 1]."""
    if per_token:
        nc = c.float().norm(dim=-1, keepdim=True)
        ng = g.float().norm(dim=-1, keepdim=True)
    else:
        nc, ng = c.float().norm(), g.float().norm()
    return (nc / (ng + 1e-8)).clamp(min=renorm_min, max=1.0)


def cfg_active(t: Tensor, interval: tuple[float, float]) -> bool:
    """CFG applies iff interval[0] < t <= interval[1], compared on the shifted fp32 t (as upstream,
    where t is a 0-dim fp32 tensor: the bounds are rounded to fp32 too, so t = fp32(0.4) is *not*
    above 0.4)."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return bool(t > interval[0]) and bool(t <= interval[1])


def flow_timesteps(num_timesteps: int, shift: float) -> Tensor:
    """Shifted grid t_j = shift(linspace(1, 0, n)); steps use t_0..t_{n-2} (n-1 evaluations)."""
    return shift_timesteps(torch.linspace(1, 0, num_timesteps), shift)


def latents_to_image(vae: AutoEncoder, x: Tensor, rows: int, cols: int, patch: int) -> Image.Image:
    """[rows*cols, p*p*C] latent tokens -> VAE decode -> RGB PIL image (pixels truncated to uint8)."""
    z = unpatchify(x.float(), rows, cols, patch, vae.cfg.z_channels)[None]
    with torch.no_grad():
        img = vae.decode(z.to(next(vae.parameters()).device)).float().cpu()[0]
    pixels = ((img * 0.5 + 0.5).clamp(0, 1) * 255).permute(1, 2, 0)
    return Image.fromarray(pixels.to(torch.uint8).numpy())


class Inferencer:
    """Text-to-image, understanding and editing on one BAGEL model (batch size 1)."""

    def __init__(
        self,
        model: Bagel,
        vae: AutoEncoder,
        tokenizer,
        new_token_ids: dict[str, int],
        vae_transform: ImageTransform | None = None,
        vit_transform: ImageTransform | None = None,
    ) -> None:
        self.model = model.eval()
        self.vae = vae.eval()
        self.tokenizer = tokenizer
        self.ids = dict(new_token_ids)
        self.vae_transform = vae_transform or ImageTransform(1024, 512, 16)
        self.vit_transform = vit_transform or ImageTransform(980, 224, 14)

    # ------------------------------------------------------------ context building

    @property
    def device(self) -> torch.device:
        return self.model.device

    def new_context(self) -> Context:
        return Context(self.model.new_cache())

    def _tokens(self, ids: list[int]) -> Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def push_text(self, ctx: Context, text: str) -> None:
        """``<|im_start|>`` ids ``<|im_end|>``, causal, understanding expert, RoPE r..r+n+1."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        toks = [self.ids["bos_token_id"], *ids, self.ids["eos_token_id"]]
        n = len(toks)
        pos = torch.arange(ctx.rope, ctx.rope + n, device=self.device)
        self.model.forward_cached(
            self.model.embed_text(self._tokens(toks)),
            pos,
            Routing.all_und(n),
            ctx.cache,
            causal=True,
            update_cache=True,
        )
        ctx.rope += n

    def _image_chunk(self, inner: Tensor) -> Tensor:
        """[<|vision_start|>, inner tokens, <|vision_end|>] embeddings."""
        marks = self.model.embed_text(self._tokens([self.ids["start_of_image"], self.ids["end_of_image"]]))
        return torch.cat([marks[:1], inner.to(marks.dtype), marks[1:]], 0)

    @torch.no_grad()
    def push_vit_image(self, ctx: Context, image: Image.Image) -> None:
        """ViT patches of the (already VAE-resized) image: one full chunk, one RoPE id."""
        pixels = self.vit_transform(image)
        p = self.model.cfg.vit.patch_size
        rows, cols = pixels.shape[1] // p, pixels.shape[2] // p
        patches = patchify(pixels, p).to(self.device)
        ids = self._grid_ids(rows, cols, self.model.cfg.vit_max_num_patch_per_side)
        emb = self._image_chunk(self.model.embed_vit(patches, ids, [rows * cols]))
        n = emb.shape[0]
        pos = torch.full((n,), ctx.rope, device=self.device)
        self.model.forward_cached(emb, pos, Routing.all_und(n), ctx.cache, causal=False, update_cache=True)
        ctx.rope += 1

    def _grid_ids(self, rows: int, cols: int, side: int) -> Tensor:
        """2-D ids with the table side as stride (extrapolate) or bucketed (``interpolate_pos``)."""
        if self.model.cfg.interpolate_pos:
            return interpolated_position_ids(rows, cols, side, self.device)
        return grid_position_ids(rows, cols, side, self.device)

    def _latent_query(self, x: Tensor, t: float, rows: int, cols: int) -> tuple[Tensor, Routing]:
        """Mode "gen" chunk: markers on the understanding expert, latents on the generation expert."""
        ids = self._grid_ids(rows, cols, self.model.cfg.max_latent_size)
        tt = torch.full((x.shape[0],), float(t), dtype=torch.float32, device=self.device)
        emb = self._image_chunk(self.model.embed_latents(x.to(self.device), tt, ids))
        gen = torch.arange(1, x.shape[0] + 1, device=self.device)
        return emb, Routing.from_gen_indexes(gen, emb.shape[0], qk_fp32=True)

    @torch.no_grad()
    def push_vae_image(self, ctx: Context, pixels: Tensor, generator: torch.Generator | None) -> None:
        """Clean VAE latents (t = 0, posterior sampled) as one full chunk on the generation expert."""
        z = self.vae.encode(pixels[None].to(next(self.vae.parameters()).device), generator=generator)[0]
        p = self.model.cfg.latent_patch_size
        rows, cols = z.shape[1] // p, z.shape[2] // p
        x0 = patchify(z.float().cpu(), p)
        emb, route = self._latent_query(x0, 0.0, rows, cols)
        pos = torch.full((emb.shape[0],), ctx.rope, device=self.device)
        self.model.forward_cached(emb, pos, route, ctx.cache, causal=False, update_cache=True)
        ctx.rope += 1

    @torch.no_grad()
    def velocity(self, ctx: Context, x: Tensor, t: float, rows: int, cols: int) -> Tensor:
        """Predicted velocity [N, 64] of latents x at time t against a context, on the CPU in the
        model's dtype (bf16 for the release, as upstream's autocast ``llm2vae`` output)."""
        emb, route = self._latent_query(x, t, rows, cols)
        pos = torch.full((emb.shape[0],), ctx.rope, device=self.device)
        hidden = self.model.forward_cached(emb, pos, route, ctx.cache, causal=False, update_cache=False)
        return self.model.llm2vae(hidden[1:-1]).cpu()

    # ------------------------------------------------------------ decoding text

    @torch.no_grad()
    def decode_text(
        self,
        ctx: Context,
        max_length: int = 500,
        do_sample: bool = False,
        temperature: float = 0.3,
        generator: torch.Generator | None = None,
    ) -> str:
        """Greedy (or sampled) decoding from ``<|im_start|>`` on a copy of the context (inference.md 6).

        Sampling never touches the CPU default generator (which carries the image noise): without
        a ``generator`` a private, randomly seeded one is used.
        """
        if do_sample and generator is None:
            generator = torch.Generator()
            generator.seed()
        work = ctx.copy()
        bos, eos = self.ids["bos_token_id"], self.ids["eos_token_id"]
        out: list[int] = []
        token = bos
        for _ in range(max_length):
            out.append(token)
            pos = torch.tensor([work.rope], device=self.device)
            hidden = self.model.forward_cached(
                self.model.embed_text(self._tokens([token])),
                pos,
                Routing.all_und(1),
                work.cache,
                causal=True,
                update_cache=True,
            )
            work.rope += 1
            logits = self.model.language_model.lm_head(hidden[-1])
            if do_sample:
                # logits / temperature in the model dtype, softmax in fp32 (upstream autocast).
                probs = torch.softmax((logits / temperature).float(), dim=-1).cpu()
                token = int(torch.multinomial(probs, 1, generator=generator).item())
            else:
                token = int(torch.argmax(logits.float()).item())
            if token == eos:
                break
        text = self.tokenizer.decode(out[1:], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return text.split("<|im_end|>")[0].split("<|im_start|>")[0]

    # ------------------------------------------------------------ image generation

    @torch.no_grad()
    def denoise(
        self,
        gen: Context,
        cfg_text: Context,
        cfg_img: Context,
        height: int,
        width: int,
        generator: torch.Generator | None,
        guidance: Guidance,
    ) -> Image.Image:
        """Euler steps of rectified flow from noise (t=1) to data (t=0) with CFG (inference.md 8-9)."""
        step = self.model.cfg.latent_downsample
        rows, cols = height // step, width // step
        side = self.model.cfg.max_latent_size
        if rows < 1 or cols < 1:
            raise ValueError(f"image size {width}x{height} is below one latent token ({step} px)")
        if rows > side or cols > side:
            raise ValueError(
                f"image size {width}x{height} needs a {rows}x{cols} latent grid; this model's "
                f"max_latent_size {side} allows at most {side * step} px per side"
            )
        x = torch.randn(rows * cols, self.model.cfg.patch_latent_dim, generator=generator, dtype=torch.float32)
        ts = flow_timesteps(guidance.num_timesteps, guidance.timestep_shift)
        dts = ts[:-1] - ts[1:]
        for i in range(guidance.num_timesteps - 1):
            t = float(ts[i])
            active = cfg_active(ts[i], guidance.cfg_interval)
            s_t, s_i = (guidance.cfg_text_scale, guidance.cfg_img_scale) if active else (1.0, 1.0)
            c = self.velocity(gen, x, t, rows, cols)
            u_t = self.velocity(cfg_text, x, t, rows, cols) if s_t > 1.0 else None
            # Upstream also runs the image branch when s_t <= 1 and then discards it.
            u_i = self.velocity(cfg_img, x, t, rows, cols) if s_i > 1.0 and s_t > 1.0 else None
            v = cfg_combine(c, u_t, u_i, s_t, s_i, guidance.cfg_renorm_type, guidance.cfg_renorm_min)
            # Euler towards data (v points from data to noise); v * dt in v's dtype, x stays fp32.
            x = x - v * dts[i]
        return latents_to_image(self.vae, x, rows, cols, self.model.cfg.latent_patch_size)

    def _prepare_image(self, image: Image.Image) -> Image.Image:
        """RGB (alpha onto white) then the VAE resize; both branches start from this picture."""
        return self.vae_transform.resize(to_rgb(image))

    def generate(
        self,
        prompt: str,
        height: int = 1024,
        width: int = 1024,
        cfg_text_scale: float = 4.0,
        cfg_img_scale: float = 1.0,
        cfg_interval: tuple[float, float] = (0.4, 1.0),
        cfg_renorm_min: float = 0.0,
        cfg_renorm_type: str = "global",
        timestep_shift: float = 3.0,
        num_timesteps: int = 50,
        seed: int | None = None,
        think: bool = False,
        max_think_tokens: int = 1000,
    ) -> Image.Image:
        """Text-to-image (inference.md 7); defaults are the notebook's T2I values."""
        generator = _generator(seed)
        gen, cfg_img = self.new_context(), self.new_context()
        if think:
            self.push_text(gen, GEN_THINK_SYSTEM_PROMPT)
            self.push_text(cfg_img, GEN_THINK_SYSTEM_PROMPT)
        cfg_text = gen.copy()  # snapshot before the text
        self.push_text(gen, prompt)
        self.push_text(cfg_img, prompt)
        if think:
            self.push_text(gen, self.decode_text(gen, max_think_tokens))
        return self.denoise(
            gen,
            cfg_text,
            cfg_img,
            height,
            width,
            generator,
            Guidance(
                cfg_text_scale,
                cfg_img_scale,
                cfg_interval,
                cfg_renorm_min,
                cfg_renorm_type,
                timestep_shift,
                num_timesteps,
            ),
        )

    def edit(
        self,
        image: Image.Image,
        instruction: str,
        cfg_text_scale: float = 4.0,
        cfg_img_scale: float = 2.0,
        cfg_interval: tuple[float, float] = (0.0, 1.0),
        cfg_renorm_min: float = 0.0,
        cfg_renorm_type: str = "text_channel",
        timestep_shift: float = 3.0,
        num_timesteps: int = 50,
        seed: int | None = None,
        think: bool = False,
        max_think_tokens: int = 1000,
    ) -> Image.Image:
        """Editing (inference.md 10): output has the VAE-resized input's size."""
        generator = _generator(seed)
        gen, cfg_img = self.new_context(), self.new_context()
        if think:
            self.push_text(gen, GEN_THINK_SYSTEM_PROMPT)
            self.push_text(cfg_img, GEN_THINK_SYSTEM_PROMPT)
        resized = self._prepare_image(image)
        self.push_vae_image(gen, self.vae_transform(resized), generator)
        self.push_vit_image(gen, resized)
        cfg_text = gen.copy()  # snapshot after the image
        self.push_text(gen, instruction)
        self.push_text(cfg_img, instruction)
        if think:
            self.push_text(gen, self.decode_text(gen, max_think_tokens))
        return self.denoise(
            gen,
            cfg_text,
            cfg_img,
            resized.height,
            resized.width,
            generator,
            Guidance(
                cfg_text_scale,
                cfg_img_scale,
                cfg_interval,
                cfg_renorm_min,
                cfg_renorm_type,
                timestep_shift,
                num_timesteps,
            ),
        )

    def understand(
        self,
        image: Image.Image | None,
        question: str,
        max_new_tokens: int = 512,
        do_sample: bool = False,
        temperature: float = 0.3,
        seed: int | None = None,
        think: bool = False,
    ) -> str:
        """Image (optional) + question -> answer text (inference.md 5)."""
        ctx = self.new_context()
        if think:
            self.push_text(ctx, VLM_THINK_SYSTEM_PROMPT)
        if image is not None:
            self.push_vit_image(ctx, self._prepare_image(image))
        self.push_text(ctx, question)
        return self.decode_text(ctx, max_new_tokens, do_sample, temperature, _generator(seed))

    # ------------------------------------------------------------ upstream's interleaved entry point

    def __call__(self, image: Image.Image | None = None, text: str | None = None, **kwargs) -> dict:
        """Upstream's ``inferencer(image=..., text=...)``: the image always goes first; returns
        ``{"image": ..., "text": ...}`` with the last output of each kind (or None)."""
        out: dict = {"image": None, "text": None}
        items = [x for x in (image, text) if x is not None]
        if not items:
            print("Please provide at least one input: either an image or text.")
            return out
        for result in self.interleave_inference(items, **kwargs):
            out["image" if isinstance(result, Image.Image) else "text"] = result
        return out

    def interleave_inference(
        self,
        input_lists: list,
        think: bool = False,
        understanding_output: bool = False,
        max_think_token_n: int = 1000,
        do_sample: bool = False,
        text_temperature: float = 0.3,
        cfg_text_scale: float = 3.0,
        cfg_img_scale: float = 1.5,
        cfg_interval: tuple[float, float] = (0.4, 1.0),
        timestep_shift: float = 3.0,
        num_timesteps: int = 50,
        cfg_renorm_min: float = 0.0,
        cfg_renorm_type: str = "global",
        image_shapes: tuple[int, int] = (1024, 1024),
        seed: int | None = None,
    ) -> list:
        """Texts and images in order (inference.md 5, 7, 10, 11), with upstream's defaults.

        Three contexts: gen (everything), cfg_text (a snapshot before each text and after each
        image) and cfg_img (texts only). Images are pushed as a clean VAE item then a ViT item
        (ViT only for understanding); an image input sets ``image_shapes``. Returns the outputs:
        the answer text, or the optional think text followed by the image.
        """
        generator = _generator(seed)
        text_generator = _generator(seed) if do_sample else None
        outputs: list = []
        gen, cfg_text, cfg_img = self.new_context(), self.new_context(), self.new_context()
        if think:
            system = VLM_THINK_SYSTEM_PROMPT if understanding_output else GEN_THINK_SYSTEM_PROMPT
            self.push_text(gen, system)
            self.push_text(cfg_img, system)
        for item in input_lists:
            if isinstance(item, str):
                cfg_text = gen.copy()
                self.push_text(gen, item)
                self.push_text(cfg_img, item)
            elif isinstance(item, Image.Image):
                resized = self._prepare_image(item)
                if not understanding_output:
                    self.push_vae_image(gen, self.vae_transform(resized), generator)
                self.push_vit_image(gen, resized)
                image_shapes = (resized.height, resized.width)
                cfg_text = gen.copy()
            else:
                raise TypeError(f"inputs must be str or PIL images, got {type(item).__name__}")
        if understanding_output:
            outputs.append(self.decode_text(gen, max_think_token_n, do_sample, text_temperature, text_generator))
            return outputs
        if think:
            plan = self.decode_text(gen, max_think_token_n, do_sample, text_temperature, text_generator)
            self.push_text(gen, plan)
            outputs.append(plan)
        outputs.append(
            self.denoise(
                gen,
                cfg_text,
                cfg_img,
                image_shapes[0],
                image_shapes[1],
                generator,
                Guidance(
                    cfg_text_scale,
                    cfg_img_scale,
                    cfg_interval,
                    cfg_renorm_min,
                    cfg_renorm_type,
                    timestep_shift,
                    num_timesteps,
                ),
            )
        )
        return outputs


def _generator(seed: int | None) -> torch.Generator | None:
    return torch.Generator().manual_seed(int(seed)) if seed is not None else None


def image_to_array(image: Image.Image) -> np.ndarray:
    """uint8 HWC array (for comparisons in tests and scripts)."""
    return np.asarray(image.convert("RGB"))
