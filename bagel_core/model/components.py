"""Pre-training from separate pretrained components (upstream's ``--llm_path``, ``--vit_path``,
``--vae_path``; training.md 3 step 5, model.md 2-4): a Qwen2 checkpoint directory, a SigLIP vision
checkpoint directory and FLUX's ``ae.safetensors`` become one BAGEL state dict with released keys.

* LLM: Hugging Face Qwen2 keys ``model.*`` / ``lm_head.*`` -> ``language_model.*``; the per-head
  q/k norms Qwen2.5 lacks start at ones; with ``copy_init_moe`` every ``*_moe_gen*`` tensor copies its
  understanding twin; a tied checkpoint's ``lm_head`` is the embedding.
* ViT: SigLIP keys (with or without the ``vision_model.`` level) -> ``vit_model.vision_model.*``; the
  14x14 patch convolution becomes the Linear(588 -> hidden) of the NaViT variant (weight permuted to
  (out, row, column, channel)); layers beyond ``json layers + 1 + vit_select_layer`` and the pooling
  head are dropped.
* Everything BAGEL adds (connector, timestep embedder, ``vae2llm``, ``llm2vae``, both sin-cos tables)
  is freshly initialised, as upstream does.

Only safetensors are read (nothing is unpickled); keys and shapes are checked with errors that name them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open

from bagel_core.config.errors import ConfigError
from bagel_core.model.bagel import Bagel, build_model
from bagel_core.model.checkpoint_io import check_keys, expected_shapes, key_listing
from bagel_core.model.config import BagelConfig, LLMConfig, ViTConfig, llm_from_json, vit_from_json

LLM_PREFIX = "language_model."
VIT_PREFIX = "vit_model.vision_model."
#: Parts of BAGEL that no pretrained component provides.
FRESH_MODULES = ("connector", "vit_pos_embed", "time_embedder", "vae2llm", "llm2vae", "latent_pos_embed")


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path} not found: --{what} must be a Hugging Face checkpoint directory with config.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON ({exc})") from exc


def _safetensors_files(directory: Path, what: str) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"--{what} {directory}: no *.safetensors weights (pickled .bin files are not read)")
    return files


def llm_config_from_hf(llm_path: str | Path, layer_module: str, qk_norm: bool, tie_word_embeddings: bool) -> LLMConfig:
    """The LLM config of a Qwen2 directory with upstream's training overrides (model.md 2.1)."""
    cfg = llm_from_json(_read_json(Path(llm_path) / "config.json", "llm_path"))
    return dataclasses.replace(cfg, layer_module=layer_module, qk_norm=qk_norm, tie_word_embeddings=tie_word_embeddings)


def vit_config_from_hf(vit_path: str | Path, vit_select_layer: int) -> ViTConfig:
    """The SigLIP config; built depth = json layers + 1 + ``vit_select_layer`` (27 + 1 - 2 = 26)."""
    data = _read_json(Path(vit_path) / "config.json", "vit_path")
    data = data.get("vision_config", data)  # a full SigLIP (text + vision) config nests it
    cfg = vit_from_json(data)
    layers = int(data.get("num_hidden_layers", 27)) + 1 + vit_select_layer
    if not 0 < layers <= int(data.get("num_hidden_layers", 27)):
        raise ConfigError(f"--vit_select_layer {vit_select_layer} leaves {layers} of the ViT's layers; use -2")
    return dataclasses.replace(cfg, num_hidden_layers=layers)


def _tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                out[key] = f.get_tensor(key).float()
    return out


def llm_weights_from_hf(llm_path: str | Path, cfg: BagelConfig) -> dict[str, torch.Tensor]:
    """``language_model.*`` tensors of a Qwen2 checkpoint (q/k norms and MoT twins filled later)."""
    raw = _tensors(_safetensors_files(Path(llm_path), "llm_path"))
    out = {LLM_PREFIX + k: v for k, v in raw.items() if k.startswith(("model.", "lm_head."))}
    if LLM_PREFIX + "lm_head.weight" not in out and LLM_PREFIX + "model.embed_tokens.weight" in out:
        out[LLM_PREFIX + "lm_head.weight"] = out[LLM_PREFIX + "model.embed_tokens.weight"].clone()
    return out


def vit_weights_from_hf(vit_path: str | Path, cfg: BagelConfig) -> dict[str, torch.Tensor]:
    """``vit_model.vision_model.*`` tensors of a SigLIP checkpoint, patch convolution as Linear."""
    out: dict[str, torch.Tensor] = {}
    layers = cfg.vit.num_hidden_layers
    for key, value in _tensors(_safetensors_files(Path(vit_path), "vit_path")).items():
        name = key.removeprefix("vision_model.")
        if name.startswith("head.") or not name.startswith(("embeddings.", "encoder.", "post_layernorm.")):
            continue
        if name.startswith("encoder.layers.") and int(name.split(".")[2]) >= layers:
            continue  # the layers after vit_select_layer are never built
        if name == "embeddings.patch_embedding.weight" and value.dim() == 4:
            value = value.permute(0, 2, 3, 1).reshape(value.shape[0], -1)  # (out, c, kh, kw) -> (out, kh*kw*c)
        out[VIT_PREFIX + name] = value
    return out


def _fresh(model: Bagel, names: list[str], expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Freshly initialised tensors for the given state-dict keys (only their modules are materialised)."""
    out: dict[str, torch.Tensor] = {}
    for attr in sorted({n.split(".")[0] for n in names if n.split(".")[0] in FRESH_MODULES}):
        module = getattr(model, attr).to_empty(device="cpu")
        for sub in module.modules():
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
        out.update({f"{attr}.{k}": v for k, v in module.state_dict().items()})
    if "llm2vae.weight" in out:
        out["llm2vae.weight"].zero_()
        out["llm2vae.bias"].zero_()
    for name in names:  # RMSNorm weights Qwen2.5 lacks (per-head q/k norms) start at one
        if name not in out and name.endswith(("q_norm.weight", "k_norm.weight")):
            out[name] = torch.ones(expected[name])
    return {k: v for k, v in out.items() if k in set(names)}


def weights_from_components(
    cfg: BagelConfig, llm_path: str | Path, vit_path: str | Path | None, copy_init_moe: bool = True
) -> dict[str, torch.Tensor]:
    """The full fp32 BAGEL state dict for ``cfg`` from pretrained components plus fresh adapters."""
    model = build_model(cfg, "meta")
    expected = expected_shapes(model)
    state = llm_weights_from_hf(llm_path, cfg)
    if cfg.visual_und:
        if vit_path is None:
            raise ConfigError("--visual_und True needs --vit_path (a SigLIP checkpoint directory)")
        state.update(vit_weights_from_hf(vit_path, cfg))
    gen_twins = [k for k in expected if "_moe_gen" in k and k not in state]
    missing = [k for k in expected if k not in state and k not in gen_twins]
    state.update(_fresh(model, missing, expected))
    if copy_init_moe:
        state.update({k: state[k.replace("_moe_gen", "")].clone() for k in gen_twins})
    else:
        state.update(_fresh_twins(model, gen_twins))
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ConfigError(
            f"{llm_path} / {vit_path}: tensors BAGEL does not have: {key_listing(unexpected)} (is --llm_path a "
            "Qwen2 checkpoint and --vit_path a SigLIP vision checkpoint?)"
        )
    found = {k: tuple(v.shape) for k, v in state.items()}
    fix = "Check --llm_path / --vit_path / --vit_select_layer / --layer_module."
    check_keys(f"{llm_path} + {vit_path}", expected, found, "BAGEL model", Path(llm_path), fix)
    return state


def _fresh_twins(model: Bagel, names: list[str]) -> dict[str, torch.Tensor]:
    """Without ``copy_init_moe``: the generation expert keeps PyTorch's default initialisation."""
    layers = model.language_model.to_empty(device="cpu")
    for sub in layers.modules():
        if hasattr(sub, "reset_parameters"):
            sub.reset_parameters()
    state = {LLM_PREFIX + k: v for k, v in layers.state_dict().items()}
    return {k: state[k] for k in names}
