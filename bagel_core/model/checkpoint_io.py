"""Save and load model directories in the released BAGEL layout (model.md section 9).

A directory holds ``llm_config.json``, ``vit_config.json`` (27-layer convention: one more than
is built), ``ema.safetensors`` and/or ``model.safetensors``, ``ae.safetensors`` and the tokenizer
files; we add an optional ``bagel_config.json`` (top-level fields and the VAE record) that the
release lacks and that defaults to the release values. Loading is strict: keys and shapes are
compared from the safetensors headers before any tensor is read, and errors name the file, a few
keys, the counts and the fix. Only safetensors are read; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bagel_core.config.errors import ConfigError
from bagel_core.model.autoencoder import AutoEncoder
from bagel_core.model.bagel import Bagel, build_model
from bagel_core.model.config import (
    BagelConfig,
    extra_from_json,
    extra_to_json,
    llm_from_json,
    llm_to_json,
    vit_from_json,
    vit_to_json,
)
from bagel_core.model.embeddings import sincos_2d_table

LLM_CONFIG = "llm_config.json"
VIT_CONFIG = "vit_config.json"
EXTRA_CONFIG = "bagel_config.json"
EMA_WEIGHTS = "ema.safetensors"
MODEL_WEIGHTS = "model.safetensors"
VAE_WEIGHTS = "ae.safetensors"
_SHOW = 5


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> None:
    out = {}
    for k, v in tensors.items():
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous().cpu()
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(out, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def save_model_dir(
    out_dir: str | Path,
    model: Bagel,
    vae: AutoEncoder | None = None,
    tokenizer=None,
    weights_name: str = EMA_WEIGHTS,
    dtype: torch.dtype | None = torch.bfloat16,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write an inference-ready directory; ``state_dict`` overrides the model's (e.g. EMA weights)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model_configs(out, model.cfg)
    _save_tensors(out / weights_name, state_dict if state_dict is not None else model.state_dict(), dtype)
    if vae is not None:
        # The VAE stays fp32 (inference.md 2.1: it is used in the file's dtype).
        _save_tensors(out / VAE_WEIGHTS, vae.state_dict(), torch.float32)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def read_config(model_dir: str | Path, max_latent_size: int | None = None) -> BagelConfig:
    """Configuration of a directory: the two JSON files (+ ``bagel_config.json`` if present)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise ConfigError(f"model directory {d} does not exist (expected the released BAGEL layout)")
    data = {}
    for name in (LLM_CONFIG, VIT_CONFIG):
        path = d / name
        if not path.is_file():
            raise ConfigError(
                f"{path} not found: a BAGEL model directory needs {LLM_CONFIG} and {VIT_CONFIG} "
                "(copy them from the released BAGEL-7B-MoT directory)"
            )
        try:
            data[name] = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: invalid JSON ({exc})") from exc
    llm = llm_from_json(data[LLM_CONFIG])
    vit = vit_from_json(data[VIT_CONFIG])
    extra_path = d / EXTRA_CONFIG
    extra = json.loads(extra_path.read_text(encoding="utf-8")) if extra_path.is_file() else {}
    cfg = extra_from_json(extra, llm, vit)
    if max_latent_size is not None:
        cfg.max_latent_size = max_latent_size
    return cfg


def weights_file(model_dir: str | Path, which: str | None = None) -> Path:
    """``ema.safetensors`` (preferred, the release has only it) or ``model.safetensors``."""
    d = Path(model_dir)
    names = {"ema": [EMA_WEIGHTS], "model": [MODEL_WEIGHTS], None: [EMA_WEIGHTS, MODEL_WEIGHTS]}[which]
    for name in names:
        if (d / name).is_file():
            return d / name
    raise ConfigError(f"{d}: no {' or '.join(names)} found; put the trained weights (safetensors) next to the configs")


def header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


def key_listing(keys: list[str]) -> str:
    """The first few keys, sorted, and how many more."""
    shown = ", ".join(sorted(keys)[:_SHOW])
    more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return f"{shown}{more}"


def check_keys(
    path: str | Path,
    expected: dict[str, tuple[int, ...]],
    found: dict[str, tuple[int, ...]],
    what: str,
    config_dir: Path | None = None,
    fix: str = "Check that the configs belong to these weights (same preset / layer_module / visual_gen, "
    "visual_und) and that the file was saved by BAGEL.",
) -> None:
    """Strict key and shape comparison; the error names missing/unexpected/mismatched keys and ``fix``."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys: {key_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {key_listing(unexpected)}")
    if wrong:
        shown = "; ".join(f"{k} file {found[k]} vs model {tuple(expected[k])}" for k in wrong[:_SHOW])
        parts.append(f"{len(wrong)} keys with a different shape: {shown}")
    where = Path(path).parent if config_dir is None else config_dir
    raise ConfigError(
        f"{path} does not match the {what} built from the configs in {where}: " + "; ".join(parts) + ". " + fix
    )


def _check_tables(path: Path, cfg: BagelConfig, found: dict[str, tuple[int, ...]]) -> None:
    """Explain the two table-size mistakes specifically (model.md section 10)."""
    key = "latent_pos_embed.pos_embed"
    if cfg.visual_gen and key in found and found[key][0] != cfg.max_latent_size**2:
        rows = found[key][0]
        side = round(rows**0.5)
        raise ConfigError(
            f"{path}: {key} has {rows} rows (max_latent_size {side}), but the model is built with "
            f"max_latent_size {cfg.max_latent_size} ({cfg.max_latent_size**2} rows). The released "
            "inference layout needs max_latent_size=64: retrain/fine-tune with --max_latent_size 64, "
            f"or set max_latent_size={side} in {EXTRA_CONFIG} / pass max_latent_size={side}."
        )
    key = "vit_pos_embed.pos_embed"
    if cfg.visual_und and key in found and found[key][0] != cfg.vit_max_num_patch_per_side**2:
        raise ConfigError(
            f"{path}: {key} has {found[key][0]} rows but vit_max_num_patch_per_side is "
            f"{cfg.vit_max_num_patch_per_side}; the release uses 70 (980 px / 14)"
        )


def expected_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _load_cast(path: Path, device: torch.device | str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read tensors one at a time and cast each before the next is read: an fp32 training
    checkpoint (58 GB for 7B) loads into bf16 (29 GB) without ever holding both copies."""
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            t = f.get_tensor(key)
            state[key] = t.to(dtype) if t.is_floating_point() else t
    return state


#: Key prefixes of the branches a config can leave out (``visual_und`` / ``visual_gen`` False).
BRANCH_PREFIXES = {
    "visual_und": ("vit_model.", "connector.", "vit_pos_embed."),
    "visual_gen": ("time_embedder.", "vae2llm.", "llm2vae.", "latent_pos_embed."),
}


def weights_keys(path: str | Path, cfg: BagelConfig) -> list[str]:
    """The keys of ``path`` a model built from ``cfg`` loads, after checking keys, shapes and table sizes
    from the header only; keys of a branch the config leaves out (``visual_gen False`` fine-tuning from
    the full release) are skipped."""
    path = Path(path)
    found = header_shapes(path)
    _check_tables(path, cfg, found)
    skipped = tuple(p for flag, prefixes in BRANCH_PREFIXES.items() if not getattr(cfg, flag) for p in prefixes)
    wanted = {k: v for k, v in found.items() if not k.startswith(skipped)} if skipped else found
    check_keys(path, expected_shapes(build_model(cfg, "meta")), wanted, "BAGEL model")
    return list(wanted)


def read_weights(path: str | Path, cfg: BagelConfig, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The checked full state dict of ``path`` for a model built from ``cfg`` (CPU, cast to ``dtype``
    one tensor at a time)."""
    keys = weights_keys(path, cfg)
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in keys:
            t = f.get_tensor(key)
            state[key] = t.to(dtype) if t.is_floating_point() else t
    return state


def fresh_position_tables(state: dict[str, torch.Tensor], cfg: BagelConfig) -> dict[str, torch.Tensor]:
    """Replace both sin-cos tables by freshly computed fp32 ones, as upstream's training path does (the
    stored bf16 tables differ by up to 2e-3, enough to move the first loss)."""
    tables = {
        "vit_pos_embed.pos_embed": (cfg.visual_und, cfg.vit_max_num_patch_per_side),
        "latent_pos_embed.pos_embed": (cfg.visual_gen, cfg.max_latent_size),
    }
    for key, (present, side) in tables.items():
        if present and key in state:
            state[key] = torch.from_numpy(sincos_2d_table(side, cfg.llm.hidden_size)).float()
    return state


def save_model_configs(out_dir: str | Path, cfg: BagelConfig) -> None:
    """Write ``llm_config.json``, ``vit_config.json`` and ``bagel_config.json`` for ``cfg``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / LLM_CONFIG, llm_to_json(cfg.llm))
    _write_json(out / VIT_CONFIG, vit_to_json(cfg.vit))
    _write_json(out / EXTRA_CONFIG, extra_to_json(cfg))


def load_model_dir(
    model_dir: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    which: str | None = None,
    max_latent_size: int | None = None,
    attn_backend: str = "sdpa",
) -> Bagel:
    """Build BAGEL from a directory's configs on meta, check the weights' headers, then load them."""
    cfg = read_config(model_dir, max_latent_size)
    path = weights_file(model_dir, which)
    found = header_shapes(path)
    _check_tables(path, cfg, found)
    model = build_model(cfg, "meta", attn_backend=attn_backend)
    check_keys(path, expected_shapes(model), found, "BAGEL model")
    state = _load_cast(path, device, dtype)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    model.load_state_dict(state, strict=True, assign=True)
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    return model


def load_vae(model_dir: str | Path, cfg: BagelConfig | None = None, device: torch.device | str = "cpu") -> AutoEncoder:
    """FLUX VAE from ``model_dir/ae.safetensors`` or a ``.safetensors`` file (pre-training's
    ``--vae_path``); kept in the file's dtype, frozen, eval mode."""
    path = Path(model_dir)
    if path.suffix != ".safetensors":
        cfg = cfg or read_config(path)
        path = path / VAE_WEIGHTS
    if not path.is_file():
        raise ConfigError(f"{path} not found: copy FLUX's ae.safetensors from the released BAGEL directory")
    with torch.device("meta"):
        vae = AutoEncoder((cfg or BagelConfig()).vae)
    check_keys(path, expected_shapes(vae), header_shapes(path), "FLUX autoencoder")
    state = load_file(str(path), device=str(device))
    vae.load_state_dict(state, strict=True, assign=True)
    vae.requires_grad_(False)
    return vae.eval()
