"""Typed configuration of BAGEL and its presets (model.md section 2).

The released directory stores only ``llm_config.json`` (Qwen2 fields) and ``vit_config.json``
(SigLIP fields, with the checkpoint's 27 layers of which 26 are built); everything else is a code
constant. We keep the same two files and add an optional ``bagel_config.json`` carrying the
top-level fields and the VAE record, so a non-release (e.g. ``tiny``) directory round-trips; a
directory without it gets the release values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from bagel_core.config.errors import ConfigError

LAYER_MODULES = ("Qwen2DecoderLayer", "Qwen2MoEDecoderLayer", "Qwen2MoTDecoderLayer")


@dataclass
class LLMConfig:
    """Qwen2 decoder; defaults are the released BAGEL-7B-MoT values (model.md 2.1)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qk_norm: bool = True
    layer_module: str = "Qwen2MoTDecoderLayer"
    freeze_und: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def use_moe(self) -> bool:
        """Upstream's rule: the layer name contains "Mo" (MoE or MoT)."""
        return "Mo" in self.layer_module

    def validate(self) -> None:
        if self.layer_module not in LAYER_MODULES:
            raise ConfigError(f"llm_config: layer_module {self.layer_module!r} is not one of {LAYER_MODULES}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("llm_config: hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("llm_config: num_attention_heads must be divisible by num_key_value_heads")
        if self.hidden_size % 4:
            raise ConfigError("llm_config: hidden_size must be divisible by 4 (2-D sin-cos tables)")
        if self.hidden_act != "silu":
            raise ConfigError(f"llm_config: hidden_act {self.hidden_act!r} unsupported (BAGEL uses silu)")


@dataclass
class ViTConfig:
    """SigLIP NaViT encoder; ``num_hidden_layers`` is the number of layers *built* (26 for 7B)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 26
    num_attention_heads: int = 16
    patch_size: int = 14
    image_size: int = 980
    num_channels: int = 3
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size * self.patch_size


@dataclass
class VAEConfig:
    """FLUX autoencoder parameters (model.md 2.3); hard-coded upstream."""

    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class BagelConfig:
    """Top-level configuration (model.md 2.4) with the release's values as defaults."""

    llm: LLMConfig = field(default_factory=LLMConfig)
    vit: ViTConfig = field(default_factory=ViTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    visual_gen: bool = True
    visual_und: bool = True
    latent_patch_size: int = 2
    max_latent_size: int = 64
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"
    interpolate_pos: bool = False
    timestep_shift: float = 1.0

    @property
    def latent_channel(self) -> int:
        return self.vae.z_channels

    @property
    def patch_latent_dim(self) -> int:
        return self.latent_patch_size**2 * self.vae.z_channels

    @property
    def latent_downsample(self) -> int:
        """Pixels per latent token side (16 for the release)."""
        return self.vae.downsample * self.latent_patch_size

    def validate(self) -> None:
        self.llm.validate()
        if self.vit.num_patches_per_side != self.vit_max_num_patch_per_side and self.visual_und:
            raise ConfigError(
                f"vit_config: image_size/patch_size = {self.vit.num_patches_per_side} but "
                f"vit_max_num_patch_per_side = {self.vit_max_num_patch_per_side}; they must agree"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- presets


def _preset_7b_mot() -> BagelConfig:
    return BagelConfig()


def _preset_tiny() -> BagelConfig:
    """A few layers and small widths, same code path; the real 152,064-row vocabulary."""
    return BagelConfig(
        llm=LLMConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        vit=ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        vae=VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
    )


def _preset_small() -> BagelConfig:
    """Mid-size preset for CPU benchmarks (Qwen2.5-0.5B-like widths, few layers)."""
    return BagelConfig(
        llm=LLMConfig(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=4,
            num_attention_heads=14,
            num_key_value_heads=2,
        ),
        vit=ViTConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6),
        vae=VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1),
    )


def _preset_mid() -> BagelConfig:
    """Between ``tiny`` and ``small``, cheap enough for CPU tests of memory: every per-layer tensor is large
    enough that activations and sharding padding show (GQA with 2 KV heads, head dim 64), the real vocabulary."""
    return BagelConfig(
        llm=LLMConfig(
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        vit=ViTConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=2),
        vae=VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1),
    )


def _preset_7b_layers() -> BagelConfig:
    """BAGEL-7B-MoT's real per-layer shapes with 4 decoder and 2 ViT layers: one GPU holds it, so
    throughput and memory per layer can be measured (bench/)."""
    cfg = BagelConfig()
    cfg.llm.num_hidden_layers = 4
    cfg.vit.num_hidden_layers = 2
    return cfg


PRESETS = {
    "7b-mot": _preset_7b_mot,
    "7b-layers": _preset_7b_layers,
    "tiny": _preset_tiny,
    "mid": _preset_mid,
    "small": _preset_small,
}


def preset(name: str) -> BagelConfig:
    """Return a fresh configuration for a named preset (``7b-mot``, ``7b-layers``, ``tiny``, ``mid``, ``small``)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None


# ---------------------------------------------------------------- JSON files of the release layout

_LLM_JSON_EXTRA = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "torch_dtype": "bfloat16",
    "use_sliding_window": False,
}
_VIT_JSON_EXTRA = {"model_type": "siglip_vision_model", "attention_dropout": 0.0}


def llm_to_json(cfg: LLMConfig) -> dict[str, Any]:
    data = dataclasses.asdict(cfg)
    data.update(_LLM_JSON_EXTRA)
    return data


def llm_from_json(data: dict[str, Any]) -> LLMConfig:
    """Read Qwen2 fields, ignore the rest; then apply upstream's forced overrides (model.md 2.1)."""
    names = {f.name for f in dataclasses.fields(LLMConfig)}
    cfg = LLMConfig(**{k: v for k, v in data.items() if k in names})
    cfg.qk_norm = True
    cfg.tie_word_embeddings = False
    cfg.layer_module = "Qwen2MoTDecoderLayer"
    return cfg


def vit_to_json(cfg: ViTConfig) -> dict[str, Any]:
    """The JSON keeps the checkpoint convention: one more layer than is built."""
    data = dataclasses.asdict(cfg)
    data["num_hidden_layers"] = cfg.num_hidden_layers + 1
    data.update(_VIT_JSON_EXTRA)
    return data


def vit_from_json(data: dict[str, Any]) -> ViTConfig:
    names = {f.name for f in dataclasses.fields(ViTConfig)}
    cfg = ViTConfig(**{k: v for k, v in data.items() if k in names})
    cfg.num_hidden_layers = int(data.get("num_hidden_layers", 27)) - 1
    return cfg


def extra_to_json(cfg: BagelConfig) -> dict[str, Any]:
    """Top-level fields and VAE record (our ``bagel_config.json``; upstream has no such file)."""
    data = {k: v for k, v in cfg.to_dict().items() if k not in ("llm", "vit", "vae")}
    vae = dataclasses.asdict(cfg.vae)
    vae["ch_mult"] = list(cfg.vae.ch_mult)
    data["vae"] = vae
    return data


def extra_from_json(data: dict[str, Any], llm: LLMConfig, vit: ViTConfig) -> BagelConfig:
    vae_data = dict(data.get("vae", {}))
    if "ch_mult" in vae_data:
        vae_data["ch_mult"] = tuple(vae_data["ch_mult"])
    top = {k: v for k, v in data.items() if k != "vae"}
    names = {f.name for f in dataclasses.fields(BagelConfig)} - {"llm", "vit", "vae"}
    unknown = set(top) - names
    if unknown:
        raise ConfigError(f"bagel_config.json: unknown keys {sorted(unknown)}")
    return BagelConfig(llm=llm, vit=vit, vae=VAEConfig(**vae_data), **top)
