"""LoRA fine-tuning with ``peft`` (``--lora_rank > 0``): low-rank adapters on chosen projections of the LLM's
experts, everything else frozen.

What a LoRA run holds (``build.build_models`` calls :func:`apply_lora`, :func:`init_adapters`, :func:`adapter_ema`):

* **Base**: every parameter of the model is frozen (no gradient, no AdamW state, no EMA) and stored in bf16
  (the released weights are bf16, so this is exact for them), except the two sin-cos tables, which stay fp32
  (recomputed exactly, as without LoRA). The forward gathers them in the mixed-precision compute dtype (bf16 on
  GPU, fp32 on CPU) like any frozen parameter.
* **Adapters**: ``peft.inject_adapter_in_model`` replaces each targeted ``nn.Linear`` by peft's LoRA ``Linear``
  (``base_layer`` + ``lora_A`` / ``lora_B``, adapter name ``default``), computing
  ``base(x) + lora_B(lora_A(dropout(x))) * alpha / rank``. The adapters are fp32 and the only trainable tensors,
  so they are all that the optimizer and gradient clipping see. They sit inside the decoder layers, so FSDP2 shards
  them with their layer (``fully_shard`` per decoder layer); FSDP2 needs one dtype only among a group's trainable
  parameters, which the adapters are. ``lora_A`` starts Kaiming-uniform (peft's rule) from a generator seeded by
  ``(global_seed, name)``, ``lora_B`` at zero, so the model starts exactly as the base, and identically for any
  world size and whether it was built on ``meta`` (loaded weights) or on the CPU (a random preset).
* **EMA**: of the adapters only (:class:`AdapterEMA`): the frozen base never changes, so its EMA would be a
  second copy of it, 2 bytes per parameter per rank for nothing. ``--ema`` applies to the adapters as it does to
  trainable parameters without LoRA; ``step_final`` merges the EMA adapters.
* **Checkpoints** (``step_<N>``, DCP, atomic, exact resume): ``model`` holds the bf16 base under peft's names
  (``...q_proj_moe_gen.base_layer.weight``) and the fp32 adapters (``...q_proj_moe_gen.lora_A.default.weight``);
  ``ema`` the EMA adapters; ``optimizer`` the adapters' AdamW state. A step directory thus restores on its own.
* **Export** (``bagel export``, ``step_final``): merged weights ``W + alpha / rank * B @ A`` under the released key
  names (loadable by ``setup_models``), or with ``--adapter-only`` the adapters alone in peft's format
  (``adapter_model.safetensors`` + ``adapter_config.json``), which :func:`apply_adapter` (or
  ``peft.PeftModel.from_pretrained``) puts on a released-layout model.

Targets (``--lora_target``, comma-separated): ``gen_attn`` (the generation expert's q/k/v/o projections),
``gen_mlp`` (its gate/up/down projections), ``und_attn`` and ``und_mlp`` (the understanding expert's), and the
shorthands ``gen``, ``und`` and ``all``. The default, ``gen_attn,gen_mlp``, adapts the expert that processes the
noised VAE latents (model.md 3): the usual LoRA fine-tune of an image generator (a style, a subject, an editing
skill), while the understanding expert, hence text and image understanding, stays exactly the released one.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from bagel_core.config.errors import ConfigError
from bagel_core.model.config import LLMConfig
from bagel_core.train.ema import _WRAPPED
from bagel_core.train.memory import TABLES, LoRASpec

#: Target groups: (module holding the projections, projection names) inside each decoder layer.
TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "gen_attn": ("self_attn", ("q_proj_moe_gen", "k_proj_moe_gen", "v_proj_moe_gen", "o_proj_moe_gen")),
    "gen_mlp": ("mlp_moe_gen", ("gate_proj", "up_proj", "down_proj")),
    "und_attn": ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
    "und_mlp": ("mlp", ("gate_proj", "up_proj", "down_proj")),
}
SHORTHANDS: dict[str, tuple[str, ...]] = {
    "gen": ("gen_attn", "gen_mlp"),
    "und": ("und_attn", "und_mlp"),
    "all": ("gen_attn", "gen_mlp", "und_attn", "und_mlp"),
}
DEFAULT_TARGET = "gen_attn,gen_mlp"
#: peft's adapter name (a path component of the adapters' parameter names).
ADAPTER = "default"
#: Storage dtype of the frozen base.
BASE_DTYPE = torch.bfloat16
#: The adapter-only export (peft's file names).
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_LAYERS = "language_model.model.layers"


def parse_target(spec: str) -> tuple[str, ...]:
    """``"gen_attn,gen_mlp"`` -> the groups in :data:`TARGETS` order; a ConfigError lists the choices."""
    words = [w.strip() for w in str(spec).split(",") if w.strip()]
    unknown = [w for w in words if w not in TARGETS and w not in SHORTHANDS]
    if unknown or not words:
        what = f"unknown target {', '.join(map(repr, unknown))}" if unknown else "no target"
        raise ConfigError(
            f"--lora_target {spec!r}: {what}; give a comma-separated list of {', '.join(TARGETS)} "
            f"or {', '.join(SHORTHANDS)} (default {DEFAULT_TARGET})"
        )
    chosen = {g for w in words for g in SHORTHANDS.get(w, (w,))}
    return tuple(g for g in TARGETS if g in chosen)


def _layer_groups(llm: LLMConfig) -> set[str]:
    """Target groups a decoder layer of this LLM has (plain Qwen2 has no generation expert, MoE only its MLP)."""
    return {
        "Qwen2MoTDecoderLayer": set(TARGETS),
        "Qwen2MoEDecoderLayer": {"gen_mlp", "und_attn", "und_mlp"},
    }.get(llm.layer_module, {"und_attn", "und_mlp"})


@dataclass(frozen=True)
class LoRA:
    """The run's LoRA settings (``rank`` 0: off)."""

    rank: int = 0
    alpha: float | None = None  # None (--lora_alpha 0): the rank, scaling 1
    dropout: float = 0.0
    target: tuple[str, ...] = parse_target(DEFAULT_TARGET)

    @classmethod
    def from_args(cls, t: Any) -> LoRA:
        """From ``TrainingArguments`` (or its ``to_dict()`` section; absent fields: LoRA off)."""
        get = t.get if isinstance(t, Mapping) else lambda k, d=None: getattr(t, k, d)
        rank = int(get("lora_rank", 0) or 0)
        if rank <= 0:
            return cls()
        alpha = get("lora_alpha", None)
        return cls(
            rank,
            float(alpha) if alpha else None,
            float(get("lora_dropout", 0.0) or 0.0),
            parse_target(get("lora_target", DEFAULT_TARGET) or DEFAULT_TARGET),
        )

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.rank

    def describe(self) -> str:
        return (
            f"LoRA rank {self.rank}, alpha {self.lora_alpha:g} (scaling {self.scaling:g}), dropout {self.dropout:g} "
            f"on {','.join(self.target)}"
        )

    def pattern(self) -> str:
        """peft ``target_modules`` regex (full match on module names) of the targeted projections."""
        alts = [f"{parent}\\.({'|'.join(projs)})" for parent, projs in (TARGETS[g] for g in self.target)]
        return rf"{re.escape(_LAYERS)}\.\d+\.({'|'.join(alts)})"

    def module_names(self, llm: LLMConfig) -> list[str]:
        """Names of the ``nn.Linear`` modules this LoRA wraps in a model of ``llm`` (unwrapped names)."""
        groups = [g for g in self.target if g in _layer_groups(llm)]
        return [
            f"{_LAYERS}.{i}.{parent}.{proj}"
            for i in range(llm.num_hidden_layers)
            for parent, projs in (TARGETS[g] for g in groups)
            for proj in projs
        ]

    def check(self, llm: LLMConfig) -> None:
        """Every target group must exist in this LLM's decoder layers."""
        missing = [g for g in self.target if g not in _layer_groups(llm)]
        if missing:
            have = ", ".join(g for g in TARGETS if g in _layer_groups(llm))
            raise ConfigError(
                f"--lora_target {','.join(self.target)}: a {llm.layer_module} model has no {', '.join(missing)} "
                f"projections (its layers have no such expert part); choose among {have}"
            )

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.dropout,
            target_modules=self.pattern(),
            bias="none",
        )

    def memory_spec(self, llm: LLMConfig) -> LoRASpec:
        """The memory plan's view (``bagel_core.train.memory``): the exact wrapped weights, so its substring
        match names exactly these (``...layers.1.`` is no substring of ``...layers.11.``)."""
        if not self.enabled:
            return LoRASpec()
        return LoRASpec(self.rank, tuple(f"{name}." for name in self.module_names(llm)))

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.lora_alpha, "dropout": self.dropout, "target": ",".join(self.target)}


# ---------------------------------------------------------------------------------------------- names
def is_adapter_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def released_key(key: str) -> str | None:
    """A LoRA model's state-dict key -> the released key it stands for; None for an adapter tensor."""
    if is_adapter_key(key):
        return None
    return key.replace(".base_layer.", ".")


def released_sources(keys: Iterable[str]) -> dict[str, str | None] | None:
    """``{model key: released key or None}`` for a model with LoRA adapters; None for one without."""
    keys = list(keys)
    if not any(is_adapter_key(k) for k in keys):
        return None
    return {k: released_key(k) for k in keys}


def adapter_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The adapters of a LoRA model (names without the activation-checkpointing wrapper), in module order."""
    return {n.replace(_WRAPPED, ""): p for n, p in module.named_parameters() if is_adapter_key(n)}


# ---------------------------------------------------------------------------------------------- building
def apply_lora(model: nn.Module, lora: LoRA, llm: LLMConfig) -> None:
    """Freeze the whole model (bf16 storage except the sin-cos tables) and inject fp32 adapters with peft, in place.

    Works on ``meta`` (adapters are created there too, see :func:`init_adapters`) and on the CPU."""
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import cast_adapter_dtype

    lora.check(llm)
    meta = any(p.is_meta for p in model.parameters())
    for module_name, module in model.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            full = f"{module_name}.{name}" if module_name else name
            if full in TABLES or not param.is_floating_point():
                param.requires_grad_(False)
                continue
            module._parameters[name] = nn.Parameter(param.detach().to(BASE_DTYPE), requires_grad=False)
    inject_adapter_in_model(lora.peft_config(), model, adapter_name=ADAPTER, low_cpu_mem_usage=meta)
    cast_adapter_dtype(model, ADAPTER)  # peft gives new adapters the base layer's dtype (bf16): train them in fp32
    wrapped = {n[: -len(".lora_A." + ADAPTER + ".weight")] for n in adapter_parameters(model) if ".lora_A." in n}
    expected = set(lora.module_names(llm))
    if wrapped != expected:  # the regex and module_names() disagree: a model change the pattern does not follow
        raise RuntimeError(f"LoRA wrapped {sorted(wrapped ^ expected)[:4]}... unlike the planned set")
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_key(name))


def initial_value(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """An adapter's initial value: ``lora_B`` zero, ``lora_A`` Kaiming-uniform (peft's default, a = sqrt(5)) from
    a generator seeded by ``(seed, name)``, so it depends on neither the world size nor the build order."""
    value = torch.zeros(shape, dtype=torch.float32)
    if ".lora_A." in name:
        gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
        nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=gen)
    return value


@torch.no_grad()
def init_adapters(model: nn.Module, seed: int) -> None:
    """Set every adapter of a materialised (possibly FSDP-sharded) model to :func:`initial_value`; each rank
    computes the full tensor and keeps its own shard (no communication)."""
    for name, param in adapter_parameters(model).items():
        full = initial_value(name, tuple(param.shape), seed)
        if isinstance(param, DTensor):
            local = param.to_local()
            full = full.to(device=local.device, dtype=local.dtype)
            shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
            local.copy_(shard)
        else:
            param.copy_(full.to(device=param.device, dtype=param.dtype))


class AdapterEMA(nn.Module):
    """The EMA of a LoRA model: a copy of its adapters only (sharded like them), under the same names, so that
    ``update_ema``, the checkpoint's ``ema`` entry and the export find them as they find a full EMA's."""

    def __init__(self, params: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        for name, value in params.items():
            *path, leaf = name.split(".")
            owner: nn.Module = self
            for part in path:
                child = owner._modules.get(part)
                if child is None:
                    child = nn.Module()
                    owner.add_module(part, child)
                owner = child
            owner.register_parameter(leaf, nn.Parameter(value.detach().clone(), requires_grad=False))


def adapter_ema(model: nn.Module) -> AdapterEMA:
    """The EMA of a LoRA model at its current adapter values."""
    return AdapterEMA(adapter_parameters(model))


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, adapters included in the total (the global, unsharded sizes)."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


# ---------------------------------------------------------------------------------------------- checkpoints
def saved_lora(checkpoint: Path) -> LoRA:
    """The LoRA settings a step directory was trained with (from its ``train_state.json``; none: off)."""
    try:
        state = json.loads((Path(checkpoint) / "train_state.json").read_text())
    except (OSError, ValueError):
        return LoRA()
    return LoRA.from_args(((state.get("config") or {}).get("training")) or {})


def check_checkpoint(lora: LoRA, checkpoint: Path, full_resume: bool) -> None:
    """A training step directory the run loads must have the same adapters (shapes and meaning) as the run asks
    for; the message names the way round (export, then start from the exported directory)."""
    saved = saved_lora(checkpoint)
    how = "auto_resume" if full_resume else "--resume_from"
    if saved.enabled and not lora.enabled:
        raise ConfigError(
            f"{checkpoint} was trained with {saved.describe()} but this run has no --lora_rank: resume with the same "
            f"--lora_* arguments, or export merged weights (`bagel export --checkpoint {checkpoint} --out DIR`) and "
            "start from them with --model_path DIR"
        )
    if lora.enabled and not saved.enabled:
        raise ConfigError(
            f"{checkpoint} has no LoRA adapters but this run asks for {lora.describe()} ({how}): export it "
            f"(`bagel export --checkpoint {checkpoint} --out DIR`) and start the LoRA run from it with --model_path DIR"
            + ("; or point --checkpoint_dir elsewhere" if full_resume else "")
        )
    if lora.enabled and (saved.rank, saved.lora_alpha, saved.target) != (lora.rank, lora.lora_alpha, lora.target):
        raise ConfigError(
            f"{checkpoint} was trained with {saved.describe()}, this run asks for {lora.describe()} ({how}): pass "
            f"--lora_rank {saved.rank} --lora_alpha {saved.lora_alpha:g} --lora_target {','.join(saved.target)}"
        )


def check_launch(training: Any, plan: Any, llm: LLMConfig) -> None:
    """Preflight: the targets exist in this model, and a step directory the plan loads has the run's adapters.
    ``training`` is the run's ``TrainingArguments``, ``plan`` its ``WeightsPlan``."""
    lora = LoRA.from_args(training)
    if lora.enabled:
        lora.check(llm)
    if plan.kind in ("resume", "checkpoint"):
        check_checkpoint(lora, Path(plan.source), full_resume=plan.kind == "resume")


def describe_plan(state: dict[str, str], training: Any) -> dict[str, str]:
    """The dry run's / start-up log's lines on where state comes from, with what LoRA changes (unchanged without)."""
    lora = LoRA.from_args(training)
    if not lora.enabled:
        return state
    out = dict(state)
    if "copy" in out.get("EMA", ""):
        out["EMA"] = "the adapters only (LoRA): a copy of their initial values"
    out["LoRA"] = (
        f"{lora.describe()}; every base weight frozen in bf16, fp32 adapters train (peft); step_final and "
        "`bagel export` merge them"
    )
    return out


# ---------------------------------------------------------------------------------------------- export / use
def merge(base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``W + scaling * B @ A`` in fp32 (what peft's ``merge`` computes for a ``Linear``)."""
    return base.float() + (lora_b.float() @ lora_a.float()) * scaling


def adapter_file_key(module: str, matrix: str) -> str:
    """peft's saved key of an adapter matrix (``PeftModel.save_pretrained``: no adapter name)."""
    return f"base_model.model.{module}.{matrix}.weight"


def apply_adapter(model: nn.Module, adapter_dir: str | Path, merged: bool = False) -> nn.Module:
    """Put an adapter written by ``bagel export --adapter-only`` on a released-layout model (e.g. from
    ``setup_models``), in place: peft LoRA layers (``merged=False``) or the merged weights (``merged=True``)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_CONFIG).is_file() or not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise ConfigError(
            f"{adapter_dir}: not an adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}, as "
            "`bagel export --adapter-only` writes them)"
        )
    config = LoraConfig.from_pretrained(str(adapter_dir))
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    state = {k.removeprefix("base_model.model."): v for k, v in load_file(adapter_dir / ADAPTER_WEIGHTS).items()}
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ConfigError(f"{adapter_dir}: adapter tensors that match no module of the model: {unexpected[:4]}")
    if merged:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name, module in list(model.named_modules()):
            if isinstance(module, BaseTunerLayer):
                module.merge()
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    return model
