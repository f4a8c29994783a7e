"""Typed training arguments (training.md 2) and a parser for the upstream spellings.

Accepts ``--a_b VALUE`` and ``--a-b VALUE`` (also ``--a_b=VALUE``); booleans take ``True``/``False``
(case-insensitive, also 1/0, yes/no). Unknown arguments are reported by name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints

from bagel_core.config.errors import ConfigError


@dataclass
class ModelArguments:
    model_path: str = "hf/BAGEL-7B-MoT"
    model_preset: str = "tiny"  # ours: a bagel_core.model preset used when no model directory is given
    max_latent_size: int = 32
    latent_patch_size: int = 2
    vit_patch_size: int = 14
    vit_max_num_patch_per_side: int = 70
    interpolate_pos: bool = False
    text_cond_dropout_prob: float = 0.1
    vae_cond_dropout_prob: float = 0.3
    vit_cond_dropout_prob: float = 0.3


@dataclass
class DataArguments:
    dataset_config_file: str = "data/configs/example.yaml"
    registry_file: str = ""  # ours: the dataset registry the config is checked against
    manifest_dir: str = ""  # ours: the `bagel data plan` manifest
    prefetch_factor: int = 2
    num_workers: int = 4
    max_num_tokens_per_sample: int = 16384
    max_num_tokens: int = 36864
    prefer_buffer_before: int = 16384
    max_buffer_size: int = 50
    data_seed: int = 42


@dataclass
class TrainingArguments:
    visual_gen: bool = True
    visual_und: bool = True
    results_dir: str = "results"
    checkpoint_dir: str = "results/checkpoints"
    global_seed: int = 4396
    auto_resume: bool = False
    resume_from: str | None = None
    resume_model_only: bool = False
    finetune_from_ema: bool = False
    log_every: int = 10
    save_every: int = 2000
    total_steps: int = 500000
    warmup_steps: int = 2000
    lr_scheduler: str = "constant"
    lr: float = 1e-4
    min_lr: float = 1e-7
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-15
    ema: float = 0.9999
    max_grad_norm: float = 1.0
    timestep_shift: float = 1.0
    mse_weight: float = 1.0
    ce_weight: float = 1.0
    ce_loss_reweighting: bool = False
    expected_num_tokens: int = 32768
    keep_last_k: int = 0  # ours: keep only the newest k step directories (0 = keep all)


@dataclass
class TrainConfig:
    model: ModelArguments = field(default_factory=ModelArguments)
    data: DataArguments = field(default_factory=DataArguments)
    training: TrainingArguments = field(default_factory=TrainingArguments)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


def _convert(name: str, hint: Any, raw: str) -> Any:
    text = str(hint)
    if hint is bool:
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"--{name}: expected True or False, got {raw!r}")
    if "None" in text and raw.lower() == "none":
        return None
    try:
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
    except ValueError as e:
        raise ConfigError(f"--{name}: cannot parse {raw!r} as {hint.__name__}") from e
    return raw


def _table() -> dict[str, tuple[str, Any]]:
    table: dict[str, tuple[str, Any]] = {}
    for section, cls in (("model", ModelArguments), ("data", DataArguments), ("training", TrainingArguments)):
        hints = get_type_hints(cls)
        for f in fields(cls):
            table[f.name] = (section, hints[f.name])
    return table


def parse_args(argv: list[str]) -> TrainConfig:
    """Parse upstream-style ``--name value`` pairs into a :class:`TrainConfig`."""
    table = _table()
    cfg = TrainConfig()
    unknown: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise ConfigError(f"unexpected positional argument {tok!r}")
        key, eq, value = tok[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                if key in table and table[key][1] is bool:
                    value = "True"  # a bare flag
                else:
                    if key not in table:
                        unknown.append(tok)
                        i += 1
                        continue
                    raise ConfigError(f"--{key}: missing value")
            else:
                value = argv[i + 1]
                i += 1
        i += 1
        if key not in table:
            unknown.append(tok.partition("=")[0])
            continue
        section, hint = table[key]
        setattr(getattr(cfg, section), key, _convert(key, hint, value))
    if unknown:
        raise ConfigError("unknown arguments: " + ", ".join(unknown))
    t = cfg.training
    if t.lr_scheduler not in ("constant", "cosine"):
        raise ConfigError(f"--lr_scheduler: {t.lr_scheduler!r} is not 'constant' or 'cosine'")
    if t.keep_last_k < 0 or t.save_every <= 0 or t.log_every <= 0:
        raise ConfigError("--keep_last_k must be >= 0, --save_every and --log_every > 0")
    return cfg
