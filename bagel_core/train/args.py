"""Training arguments, upstream-compatible: ``-m bagel_core.train`` takes the arguments of BAGEL's
``train/pretrain_unified_navit.py`` (training.md 2) plus a few of our own.

The three dataclasses carry upstream's field names, types, defaults and help text (where upstream's help
is wrong, a ``[bagel-pipeline: ...]`` note follows it). Parsing uses upstream's parser,
``transformers.HfArgumentParser``, so the spellings upstream accepts are accepted here:

* ``--a_b VALUE``, ``--a-b VALUE`` and ``--a_b=VALUE``;
* booleans ``True``/``False`` (also yes/no, t/f, y/n, 1/0, any case), a bare ``--flag`` meaning True, and
  ``--no_flag`` for the booleans whose default is True (HfArgumentParser adds those);
* unambiguous prefixes (``--num_worker 1`` is ``--num_workers 1``). A prefix that upstream's parser resolves
  resolves to the same argument here even where one of our own names shares the prefix (``--model`` is
  ``--model_path``, not ambiguous with ``--model_preset``); a prefix of the two spellings of one argument
  (``--save``) is not ambiguous (Python 3.11's argparse, hence upstream, calls it ambiguous).

Everything else is a :class:`ConfigError` whose message names the argument and the fix: unknown arguments
(with the closest names), ambiguous prefixes, bad values, and world-size contradictions
(:func:`check_world_size`), all before any process group or data is touched.
"""

import dataclasses
import difflib
import os
import sys
from argparse import Action
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, get_type_hints

from transformers import HfArgumentParser

from bagel_core.config.errors import ConfigError

PROG = "python -m bagel_core.train"


def _arg(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def _ours(default: Any, help: str, aliases: Sequence[str] = ()) -> Any:
    """A bagel-pipeline argument (not in upstream's script)."""
    meta: dict[str, Any] = {"help": f"[bagel-pipeline] {help}"}
    if aliases:
        meta["aliases"] = list(aliases)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------------- arguments
@dataclass
class ModelArguments:
    _argument_group_name: ClassVar[str] = "model arguments"

    model_path: str = _arg("hf/BAGEL-7B-MoT", "Path of the pretrained BAGEL model.")
    llm_path: str = _arg(
        "hf/Qwen2.5-0.5B-Instruct/", "Path or HuggingFace repo ID of the pretrained Qwen2-style language model."
    )
    llm_qk_norm: bool = _arg(True, "Enable QK LayerNorm (qk_norm) inside the attention blocks.")
    tie_word_embeddings: bool = _arg(False, "Share input and output word embeddings (tied embeddings).")
    layer_module: str = _arg("Qwen2MoTDecoderLayer", "Python class name of the decoder layer to instantiate.")
    vae_path: str = _arg(
        "flux/vae/ae.safetensors", "Path to the pretrained VAE checkpoint for latent-space image generation."
    )
    vit_path: str = _arg(
        "hf/siglip-so400m-14-980-flash-attn2-navit/",
        "Path or repo ID of the SigLIP Vision Transformer used for image understanding.",
    )
    max_latent_size: int = _arg(
        32,
        "Maximum latent grid size (patches per side) for the VAE latent tensor. "
        "[bagel-pipeline: 64 for the BAGEL-7B-MoT release]",
    )
    latent_patch_size: int = _arg(2, "Spatial size (in VAE pixels) covered by each latent patch.")
    vit_patch_size: int = _arg(14, "Patch size (pixels) for the Vision Transformer encoder.")
    vit_max_num_patch_per_side: int = _arg(
        70, "Maximum number of ViT patches along one image side after cropping / resize."
    )
    connector_act: str = _arg("gelu_pytorch_tanh", "Activation function used in the latent-to-text connector MLP.")
    interpolate_pos: bool = _arg(
        False, "Interpolate positional embeddings when image resolution differs from pre-training."
    )
    vit_select_layer: int = _arg(
        -2, "Which hidden layer of the ViT to take as the visual feature (negative = from the end)."
    )
    vit_rope: bool = _arg(False, "Replace ViT positional encodings with RoPE.")
    text_cond_dropout_prob: float = _arg(0.1, "Probability of dropping text embeddings during training.")
    vae_cond_dropout_prob: float = _arg(0.3, "Probability of dropping VAE latent inputs during training.")
    vit_cond_dropout_prob: float = _arg(0.3, "Probability of dropping ViT visual features during training.")
    # ---- ours
    model_preset: str = _ours(
        "tiny",
        "Model preset (tiny, mid, small, 7b-layers, 7b-mot) built with random weights when "
        "--model_path is not a directory, for runs without a model download.",
    )
    attn_backend: str | None = _ours(
        None,
        "Attention kernel: sdpa (dense mask, runs on CPU), flex (FlexAttention block mask) or flash "
        "(flash-attn varlen, CUDA). Default: flex with --use_flex True, else sdpa.",
    )


@dataclass
class DataArguments:
    _argument_group_name: ClassVar[str] = "data arguments"

    dataset_config_file: str = _arg(
        "data/configs/example.yaml", "YAML file specifying dataset groups, weights, and preprocessing rules."
    )
    prefetch_factor: int = _arg(2, "How many batches each DataLoader worker pre-loads in advance.")
    num_workers: int = _arg(4, "Number of background workers for the PyTorch DataLoader.")
    max_num_tokens_per_sample: int = _arg(
        16384, "Maximum tokens allowed in one raw sample; longer samples are skipped."
    )
    max_num_tokens: int = _arg(
        36864, "Hard limit on tokens in a packed batch; flush if adding a sample would exceed it."
    )
    prefer_buffer_before: int = _arg(
        16384, "While batch length is below this, pop from the overflow buffer before new sampling."
    )
    max_buffer_size: int = _arg(50, "Maximum number of oversized samples kept in the overflow buffer.")
    data_seed: int = _arg(42, "Seed used when shuffling / sampling data shards to ensure reproducibility.")
    # ---- ours
    dataset_info: str = _ours(
        "",
        "Dataset registry YAML (`bagel data registry` or the dataset_registry asset writes it); replaces "
        "upstream's hand-edited data/dataset_info.py.",
        aliases=("--registry_file", "--registry-file"),
    )
    manifest: str = _ours(
        "",
        "Sampling manifest directory (`bagel data plan`): which files/row groups each rank and worker reads. Optional.",
        aliases=("--manifest_dir", "--manifest-dir"),
    )
    max_bad_files: int = _ours(
        10,
        "Files of one DataLoader worker that may turn out unreadable, or changed or deleted since planning, before "
        "training stops with a message (each is skipped and counted until then; 0: no limit).",
    )
    packing: str = _ours(
        "carry",
        "Packing mode: carry (a sample that does not fit the pack opens the next one; no sample read is "
        "discarded) or upstream (upstream's rule, which discards it: editing then trains below its weight).",
    )
    latent_cache: str = _ours(
        "",
        "Folder written by `bagel data latents`: VAE images found there are not encoded again, their stored "
        "posterior moments are sampled instead (same loss). Used only with freeze_vae and when its VAE hash and "
        "image transforms match this run; otherwise training says why and encodes live.",
    )


@dataclass
class TrainingArguments:
    _argument_group_name: ClassVar[str] = "training arguments"

    # --- modality switches
    visual_gen: bool = _arg(True, "Train image generation branch.")
    visual_und: bool = _arg(True, "Train image understanding branch.")
    # --- bookkeeping & logging
    results_dir: str = _arg("results", "Root directory for logs.")
    checkpoint_dir: str = _arg("results/checkpoints", "Root directory for model checkpoints.")
    wandb_project: str = _arg("bagel", "Weights & Biases project name.")
    wandb_name: str = _arg("run", "Name shown in the Weights & Biases UI for this run.")
    wandb_runid: str = _arg("0", "Unique identifier to resume a previous W&B run, if desired.")
    wandb_resume: str = _arg("allow", "W&B resume mode: 'allow', 'must', or 'never'.")
    wandb_offline: bool = _arg(False, "Run W&B in offline mode (logs locally, sync later).")
    # --- reproducibility & resume
    global_seed: int = _arg(4396, "Base random seed; actual seed is offset by rank for DDP.")
    auto_resume: bool = _arg(False, "Automatically pick up the latest checkpoint found in checkpoint_dir.")
    resume_from: str | None = _arg(
        None,
        "Explicit checkpoint path to resume from (overrides auto_resume). [bagel-pipeline: used only "
        "when auto_resume finds no checkpoint; 'None' means none]",
    )
    resume_model_only: bool = _arg(False, "Load only model weights, ignoring optimizer/scheduler states.")
    finetune_from_ema: bool = _arg(
        False, "When resume_model_only=True, load the EMA (exponential moving average) weights instead of raw weights."
    )
    finetune_from_hf: bool = _arg(False, "Whether finetune from HugginFace model.")
    # --- reporting frequency
    log_every: int = _arg(10, "Print / log every N training steps.")
    save_every: int = _arg(2000, "Save a checkpoint every N training steps.")
    total_steps: int = _arg(500_000, "Total number of optimizer steps to train for.")
    # --- optimization & scheduler
    warmup_steps: int = _arg(2000, "Linear warm-up steps before applying the main LR schedule.")
    lr_scheduler: str = _arg("constant", "Type of LR schedule: 'constant' or 'cosine'.")
    lr: float = _arg(1e-4, "Peak learning rate after warm-up.")
    min_lr: float = _arg(1e-7, "Minimum learning rate for cosine schedule (ignored for constant).")
    beta1: float = _arg(0.9, "AdamW β₁ coefficient.")
    beta2: float = _arg(0.95, "AdamW β₂ coefficient.")
    eps: float = _arg(1e-15, "AdamW ε for numerical stability.")
    ema: float = _arg(0.9999, "Decay rate for the exponential moving average of model weights.")
    max_grad_norm: float = _arg(1.0, "Gradient clipping threshold (L2 norm).")
    timestep_shift: float = _arg(1.0, "Shift applied to diffusion timestep indices (for latent prediction).")
    mse_weight: float = _arg(1.0, "Scaling factor for the image-reconstruction MSE loss term.")
    ce_weight: float = _arg(1.0, "Scaling factor for the language cross-entropy loss term.")
    ce_loss_reweighting: bool = _arg(False, "Reweight CE loss by token importance (provided via ce_loss_weights).")
    expected_num_tokens: int = _arg(
        32768, "Soft target token count; yield the batch once it reaches or exceeds this size."
    )
    gradient_accumulation_steps: int = _arg(
        1, "Number of updates steps to accumulate before performing a backward/update pass."
    )
    peak_device_tflops: float = _arg(0.0, "Per-GPU peak BF16 TFLOPs used to compute MFU; leave at 0 to auto-detect.")
    # --- distributed training / FSDP
    num_replicate: int = _arg(
        1,
        "Number of model replicas per GPU rank for tensor parallelism. [bagel-pipeline: actually the "
        "replicate dimension of the HYBRID_SHARD mesh; num_replicate x num_shard = world size]",
    )
    num_shard: int = _arg(
        8,
        "Number of parameter shards when using FSDP HYBRID_SHARD. [bagel-pipeline: when not given it "
        "is derived from the world size (LOCAL_WORLD_SIZE, i.e. GPUs per node, if that divides it)]",
    )
    sharding_strategy: str = _arg(
        "HYBRID_SHARD",
        "FSDP sharding strategy: FULL_SHARD, SHARD_GRAD_OP, HYBRID_SHARD, etc. "
        "[bagel-pipeline: HYBRID_SHARD, FULL_SHARD or NO_SHARD]",
    )
    backward_prefetch: str = _arg("BACKWARD_PRE", "FSDP backward prefetch strategy (BACKWARD_PRE or NO_PREFETCH).")
    cpu_offload: bool = _arg(False, "Enable FSDP parameter offload to CPU.")
    # --- module freezing
    freeze_llm: bool = _arg(False, "Keep language-model weights fixed (no gradient updates).")
    freeze_vit: bool = _arg(False, "Keep ViT weights fixed during training.")
    freeze_vae: bool = _arg(True, "Keep VAE weights fixed; only predict latents, don’t fine-tune encoder/decoder.")
    freeze_und: bool = _arg(
        False,
        "Freeze the visual understanding connector layers. [bagel-pipeline: actually detaches the "
        "understanding paths inside the LLM; lm_head still trains]",
    )
    copy_init_moe: bool = _arg(True, "Duplicate initial MoE experts so each has identical initialisation.")
    use_flex: bool = _arg(False, "Enable FLEX (flash-ext friendly) packing algorithm for sequence data.")
    # ---- ours
    activation_checkpointing: bool = _ours(
        True, "Recompute decoder layers, ViT layers and the connector in backward (upstream always does)."
    )
    keep_last_k: int = _ours(0, "Keep only the newest k complete step directories (0 = keep all).")
    nonfinite_loss: str = _ours(
        "stop",
        "What a NaN or infinite loss does: 'stop' ends training naming the step and the samples of the pack; "
        "'skip' drops that optimizer step (no update, no EMA), counts it and goes on.",
    )
    observer: str = _ours(
        "",
        "module:attribute of a factory whose object rank 0 tells about the run (started, logged step, complete "
        "checkpoint, export); Dagster's training_run passes assets.pipes_observer:PipesObserver.",
    )
    device_memory_gb: float = _ours(
        0.0,
        "GiB of memory per GPU the memory plan checks the launch against (0: this machine's GPU; an '80 GB' "
        "A100/H100 has 80 GiB). Giving it plans for GPUs even on a machine without one.",
    )
    host_memory_gb: float = _ours(
        0.0,
        "GiB of host RAM per node the memory plan checks against (0: this machine's, unless --device_memory_gb "
        "plans for other machines; then host RAM is not checked).",
    )
    plan_ce_tokens: int = _ours(
        -1,
        "Most CE (text-loss) tokens one pack can hold, for the memory plan's logits (12 bytes x vocabulary each); "
        "-1: every token of --max_num_tokens.",
    )
    memory_check: str = _ours(
        "auto",
        "A launch the memory plan says will not fit: 'error' stops before any weight loads, naming the smallest "
        "change that fits; 'warn' prints that and goes on; 'off'. 'auto': error on GPUs or when a budget is "
        "given (--device_memory_gb / --host_memory_gb), warn on CPU.",
    )
    lora_rank: int = _ours(
        0,
        "LoRA rank (0: off, full training). With LoRA every base weight is frozen in bf16 and only fp32 adapters "
        "(peft) on --lora_target train; checkpoints hold the adapters, step_final and `bagel export` merge them.",
    )
    lora_alpha: float = _ours(0.0, "LoRA alpha: the adapters' output is scaled by alpha / rank (0: the rank, scale 1).")
    lora_dropout: float = _ours(0.0, "Dropout on the adapters' input (0 <= p < 1).")
    lora_target: str = _ours(
        "gen_attn,gen_mlp",
        "Projections that get adapters, comma-separated: gen_attn (generation expert q/k/v/o), gen_mlp (its "
        "gate/up/down), und_attn, und_mlp (the understanding expert's); gen, und and all are shorthands. The default "
        "adapts image generation and leaves understanding exactly the base model's.",
    )
    dry_run: bool = _ours(
        False,
        "Parse and validate the arguments (values, world size), print the resolved configuration "
        "as JSON and exit without training.",
    )


_SECTIONS: tuple[tuple[str, type], ...] = (
    ("model", ModelArguments),
    ("data", DataArguments),
    ("training", TrainingArguments),
)
# Fields that are ours, not upstream's (their prefixes never shadow an upstream name, see _expand_prefixes).
OURS: frozenset[str] = frozenset(
    [
        "model_preset",
        "attn_backend",
        "dataset_info",
        "manifest",
        "packing",
        "max_bad_files",
        "latent_cache",
        "activation_checkpointing",
        "keep_last_k",
        "nonfinite_loss",
        "observer",
        "device_memory_gb",
        "host_memory_gb",
        "plan_ce_tokens",
        "memory_check",
        "lora_rank",
        "lora_alpha",
        "lora_dropout",
        "lora_target",
        "dry_run",
    ]
)


@dataclass
class TrainConfig:
    model: ModelArguments = field(default_factory=ModelArguments)
    data: DataArguments = field(default_factory=DataArguments)
    training: TrainingArguments = field(default_factory=TrainingArguments)
    # names of the fields given on the command line (after prefix expansion); not part of to_dict()
    given: frozenset[str] = field(default_factory=frozenset, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(getattr(self, name)) for name, _ in _SECTIONS}


# ---------------------------------------------------------------------------------------------- parser
class _Parser(HfArgumentParser):
    """HfArgumentParser whose errors are ConfigErrors instead of ``sys.exit(2)``."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(message)


def build_parser() -> HfArgumentParser:
    return _Parser(
        (ModelArguments, DataArguments, TrainingArguments),
        prog=PROG,
        allow_abbrev=False,
        description="Train BAGEL. Takes the arguments of upstream's train/pretrain_unified_navit.py "
        "(same names, spellings, defaults) plus the [bagel-pipeline] ones.",
        epilog="The world size comes from WORLD_SIZE (default 1); HYBRID_SHARD needs "
        "num_replicate x num_shard = world size.",
    )


def _upstream_option_strings() -> set[str]:
    opts: set[str] = set()
    for _, cls in _SECTIONS:
        for f in dataclasses.fields(cls):
            if f.name in OURS:
                continue
            for name in (f.name, f"no_{f.name}" if f.default is True else None):
                if name:
                    opts |= {f"--{name}", f"--{name.replace('_', '-')}"}
    return opts


def _unique(actions: list[Action]) -> list[Action]:
    out: list[Action] = []
    for a in actions:
        if all(a is not b for b in out):
            out.append(a)
    return out


def _expand_prefixes(parser: HfArgumentParser, argv: Sequence[str]) -> tuple[list[str], set[str]]:
    """Rewrite ``--prefix`` tokens to full option names; return (argv, dests given).

    Upstream names are matched first, so whatever upstream's parser resolves resolves the same here."""
    table: dict[str, Action] = {k: v for k, v in parser._option_string_actions.items() if k.startswith("--")}
    upstream = _upstream_option_strings()
    out: list[str] = []
    given: set[str] = set()
    for i, tok in enumerate(argv):
        if tok == "--":
            out += argv[i:]
            break
        if not tok.startswith("--"):
            out.append(tok)
            continue
        name, eq, value = tok.partition("=")
        action = table.get(name)
        if action is None:
            for pool in ([o for o in table if o in upstream], list(table)):
                hits = [o for o in pool if o.startswith(name)]
                actions = _unique([table[o] for o in hits])
                if len(actions) == 1:
                    action = actions[0]
                    break
                if len(actions) > 1:
                    names = ", ".join(a.option_strings[0] for a in actions)
                    raise ConfigError(f"ambiguous option {name}: it is a prefix of {names}; spell it out")
            if action is not None:
                tok = action.option_strings[0] + eq + value
        if action is not None and action.dest != "help":
            given.add(action.dest)
        out.append(tok)
    return out, given


def _unknown_error(parser: HfArgumentParser, remaining: list[str]) -> ConfigError:
    names = sorted({o for o in parser._option_string_actions if o.startswith("--") and "-" not in o[2:]})
    problems: list[str] = []
    after_option = False
    for tok in remaining:
        if tok.startswith("-") and tok != "--":
            name = tok.partition("=")[0]
            key = "--" + name.lstrip("-").replace("-", "_")
            close = [SYNONYMS[key]] if SYNONYMS.get(key) in names else []
            close = close or difflib.get_close_matches(key, names, n=3, cutoff=0.6)
            hint = f" (did you mean {' or '.join(close)}?)" if close else f" (see `{PROG} --help`)"
            problems.append(f"unknown argument {name}{hint}")
            after_option = "=" not in tok
        elif after_option:
            after_option = False  # the value of the unknown option named just before
        else:
            problems.append(f"unexpected value {tok!r} (arguments are --name value pairs)")
    return ConfigError("; ".join(problems))


def world_size_from_env(name: str = "WORLD_SIZE") -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer (torchrun sets it; unset it for one process)") from None
    if value < 1:
        raise ConfigError(f"{name}={value} must be >= 1")
    return value


def parse_args(
    argv: Sequence[str] | None = None, world_size: int | None = None, local_world_size: int | None = None
) -> TrainConfig:
    """Parse upstream-style arguments into a validated :class:`TrainConfig`.

    ``world_size`` defaults to ``WORLD_SIZE`` (else 1) and ``local_world_size`` to ``LOCAL_WORLD_SIZE``;
    :func:`check_world_size` resolves and checks the FSDP mesh against them. ``--help`` exits (0).
    """
    parser = build_parser()
    args, given = _expand_prefixes(parser, list(sys.argv[1:] if argv is None else argv))
    model, data, training, remaining = parser.parse_args_into_dataclasses(
        args, return_remaining_strings=True, look_for_args_file=False
    )
    if remaining:
        raise _unknown_error(parser, remaining)
    cfg = TrainConfig(model=model, data=data, training=training, given=frozenset(given))
    for section, cls in _SECTIONS:  # Optional[str] fields: 'None' (upstream prints None that way) and '' -> None
        obj = getattr(cfg, section)
        for name, hint in get_type_hints(cls).items():
            value = getattr(obj, name, None)
            if "None" in str(hint) and isinstance(value, str) and value.strip().lower() in ("none", ""):
                setattr(obj, name, None)
    validate(cfg)
    if cfg.model.attn_backend is None:
        cfg.model.attn_backend = "flex" if cfg.training.use_flex else "sdpa"
    ws = world_size if world_size is not None else (world_size_from_env() or 1)
    lws = local_world_size if local_world_size is not None else world_size_from_env("LOCAL_WORLD_SIZE")
    check_world_size(cfg, ws, lws)
    return cfg


# ---------------------------------------------------------------------------------------------- checks
LR_SCHEDULERS = ("constant", "cosine")
MAX_PACK_TOKENS = 1 << 20  # 1M tokens in one pack: ~28x upstream's largest recipe, far past any GPU today
# Names people bring from other trainers, mapped to upstream's (the spelling check alone suggests nonsense for them).
SYNONYMS = {
    "--learning_rate": "--lr",
    "--max_steps": "--total_steps",
    "--num_train_steps": "--total_steps",
    "--train_steps": "--total_steps",
    "--seed": "--global_seed",
    "--output_dir": "--results_dir",
    "--save_steps": "--save_every",
    "--logging_steps": "--log_every",
    "--save_total_limit": "--keep_last_k",
    "--resume": "--auto_resume",
    "--resume_from_checkpoint": "--resume_from",
    "--gradient_clipping": "--max_grad_norm",
}
NONFINITE_LOSS = ("stop", "skip")
MEMORY_CHECK = ("auto", "error", "warn", "off")
# torch's ShardingStrategy names upstream passes through; upstream's checkpoint save raises
# NotImplementedError for all but FULL_SHARD and HYBRID_SHARD (training.md 9.1), i.e. at the first save.
SHARDING_STRATEGIES = ("HYBRID_SHARD", "FULL_SHARD", "NO_SHARD")
_UPSTREAM_ONLY_STRATEGIES = ("SHARD_GRAD_OP", "_HYBRID_SHARD_ZERO2")
BACKWARD_PREFETCH = ("BACKWARD_PRE", "BACKWARD_POST", "NO_PREFETCH")
ATTN_BACKENDS = ("sdpa", "flex", "flash")
LAYER_MODULES = ("Qwen2DecoderLayer", "Qwen2MoEDecoderLayer", "Qwen2MoTDecoderLayer")
WANDB_RESUME = ("allow", "must", "never", "auto")


def _choice(problems: list[str], flag: str, value: Any, choices: Sequence[str]) -> None:
    if value in choices:
        return
    low = str(value).lower()
    close = [c for c in choices if c.lower() == low] or [c for c in choices if c.lower().startswith(low)]
    close = close or difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
    names = ", ".join(choices)
    fix = f"use --{flag} {close[0]} (choices: {names})" if len(close) == 1 else f"choose one of {names}"
    problems.append(f"--{flag} {value!r} is not supported: {fix}")


def validate(cfg: TrainConfig) -> None:
    """Value-level checks that need neither data nor the world size; all problems in one ConfigError."""
    m, d, t = cfg.model, cfg.data, cfg.training
    p: list[str] = []
    _choice(p, "lr_scheduler", t.lr_scheduler, LR_SCHEDULERS)
    _choice(p, "nonfinite_loss", t.nonfinite_loss, NONFINITE_LOSS)
    _choice(p, "memory_check", t.memory_check, MEMORY_CHECK)
    if t.sharding_strategy in _UPSTREAM_ONLY_STRATEGIES:
        p.append(
            f"--sharding_strategy {t.sharding_strategy} is not supported: upstream accepts it but fails "
            f"with NotImplementedError at the first checkpoint save; use --sharding_strategy HYBRID_SHARD "
            f"or FULL_SHARD"
        )
    else:
        _choice(p, "sharding_strategy", t.sharding_strategy, SHARDING_STRATEGIES)
    _choice(p, "backward_prefetch", t.backward_prefetch, BACKWARD_PREFETCH)
    _choice(p, "layer_module", m.layer_module, LAYER_MODULES)
    _choice(p, "wandb_resume", t.wandb_resume, WANDB_RESUME)
    from bagel_core.model.config import PRESETS
    from bagel_core.plan.packing import PACKING_MODES

    _choice(p, "model_preset", m.model_preset, sorted(PRESETS))
    _choice(p, "packing", d.packing, PACKING_MODES)
    if m.attn_backend is not None:
        _choice(p, "attn_backend", m.attn_backend, ATTN_BACKENDS)
        if t.use_flex and m.attn_backend in ATTN_BACKENDS and m.attn_backend != "flex":
            p.append(
                f"--use_flex True asks for FlexAttention but --attn_backend is {m.attn_backend}: "
                f"drop one of them (or pass --attn_backend flex)"
            )

    def at_least(flag: str, value: float, low: float, what: str = "") -> None:
        if value < low:
            p.append(f"--{flag} {value} must be >= {low}{what}")

    def positive(flag: str, value: float) -> None:
        if not value > 0:
            p.append(f"--{flag} {value} must be > 0")

    at_least("keep_last_k", t.keep_last_k, 0, " (0 keeps every checkpoint)")
    at_least("device_memory_gb", t.device_memory_gb, 0, " (0: detect this machine's GPU)")
    at_least("host_memory_gb", t.host_memory_gb, 0, " (0: this machine's RAM)")
    at_least("plan_ce_tokens", t.plan_ce_tokens, -1, " (-1: every token of --max_num_tokens)")
    for flag in (
        "save_every",
        "log_every",
        "total_steps",
        "lr",
        "max_grad_norm",
        "timestep_shift",
        "gradient_accumulation_steps",
    ):
        positive(flag, getattr(t, flag))
    at_least("warmup_steps", t.warmup_steps, 0)
    at_least("min_lr", t.min_lr, 0)
    for flag in ("beta1", "beta2", "ema"):
        if not 0 <= getattr(t, flag) <= 1:
            p.append(f"--{flag} {getattr(t, flag)} must be between 0 and 1")
    for flag in ("text_cond_dropout_prob", "vae_cond_dropout_prob", "vit_cond_dropout_prob"):
        if not 0 <= getattr(m, flag) <= 1:
            p.append(f"--{flag} {getattr(m, flag)} is a probability: use a value between 0 and 1")
    at_least("num_workers", d.num_workers, 0, " (0 loads data in the training process)")
    at_least("max_bad_files", d.max_bad_files, 0, " (0: no limit)")
    if d.num_workers > 0:
        at_least("prefetch_factor", d.prefetch_factor, 1)
    for flag in ("max_num_tokens", "max_num_tokens_per_sample", "max_buffer_size"):
        at_least(flag, getattr(d, flag), 1)
    if d.max_num_tokens > MAX_PACK_TOKENS:
        p.append(
            f"--max_num_tokens {d.max_num_tokens} is beyond any device: one pack's activations and attention grow "
            f"with it (BAGEL's recipes use 10240-36864); use at most {MAX_PACK_TOKENS}"
        )
    for flag in ("max_latent_size", "latent_patch_size", "vit_patch_size", "vit_max_num_patch_per_side"):
        at_least(flag, getattr(m, flag), 1)
    positive("expected_num_tokens", t.expected_num_tokens)
    if t.expected_num_tokens > d.max_num_tokens:
        p.append(
            f"--expected_num_tokens {t.expected_num_tokens} exceeds --max_num_tokens {d.max_num_tokens}: "
            f"a pack could never reach it; lower --expected_num_tokens or raise --max_num_tokens"
        )
    if d.max_num_tokens_per_sample > d.max_num_tokens:
        p.append(
            f"--max_num_tokens_per_sample {d.max_num_tokens_per_sample} exceeds --max_num_tokens "
            f"{d.max_num_tokens}: samples in between pass the filter but fit no pack; lower "
            f"--max_num_tokens_per_sample or raise --max_num_tokens"
        )
    _validate_lora(p, t)
    if not (t.visual_gen or t.visual_und):
        p.append("--visual_gen False and --visual_und False leave nothing to train: keep at least one True")
    if p:
        raise ConfigError("invalid training arguments:\n  " + "\n  ".join(p))


def _validate_lora(p: list[str], t: TrainingArguments) -> None:
    """``--lora_*``: rank >= 0; alpha > 0, dropout in [0, 1) and known targets the run can train."""
    from bagel_core.train.lora import parse_target

    if t.lora_rank < 0:
        p.append(f"--lora_rank {t.lora_rank} must be >= 0 (0 turns LoRA off)")
    try:
        groups = parse_target(t.lora_target)
    except ConfigError as exc:
        p.append(str(exc))
        groups = ()
    if t.lora_alpha < 0:
        p.append(f"--lora_alpha {t.lora_alpha} must be >= 0 (the adapters' scale is alpha / rank; 0: the rank)")
    if not 0 <= t.lora_dropout < 1:
        p.append(f"--lora_dropout {t.lora_dropout} must be in [0, 1)")
    if t.lora_rank <= 0:
        return
    gen = [g for g in groups if g.startswith("gen_")]
    und = [g for g in groups if g.startswith("und_")]
    if gen and not t.visual_gen:
        p.append(
            f"--lora_target {','.join(gen)} adapts the generation expert, which --visual_gen False never runs: "
            "choose und_attn / und_mlp, or keep --visual_gen True"
        )
    if und and t.freeze_und:
        p.append(
            f"--lora_target {','.join(und)} adapts the understanding expert, whose paths --freeze_und True detaches "
            "(its adapters would never train): drop --freeze_und or choose gen_attn / gen_mlp"
        )


def check_world_size(cfg: TrainConfig, world_size: int, local_world_size: int | None = None) -> None:
    """Resolve the FSDP mesh (``num_replicate``, ``num_shard``) for ``world_size`` ranks, or raise.

    Values given on the command line are checked as upstream's FSDP setup would use them:

    * HYBRID_SHARD: ``num_replicate x num_shard`` must equal the world size (upstream's device mesh);
      a ``num_shard`` that was not given is derived: ``world_size / num_replicate``, or with neither
      given, GPUs per node (``local_world_size``) when that divides the world size, else the world size.
      (Upstream keeps the default 8, which fails on any world size but 8.)
    * FULL_SHARD shards over all ranks: a given ``num_shard`` must equal the world size and
      ``num_replicate`` must be 1; resolved to (1, world_size).
    * NO_SHARD replicates on every rank: a given ``num_shard`` must be 1; resolved to (world_size, 1).
    """
    t, given = cfg.training, cfg.given
    w = world_size
    if w < 1:
        raise ConfigError(f"world size {w} must be >= 1")
    src = f"world size {w} (WORLD_SIZE, i.e. nnodes x nproc_per_node)"
    has_shard, has_rep = "num_shard" in given, "num_replicate" in given
    if t.num_shard < 1 or t.num_replicate < 1:
        raise ConfigError(f"--num_shard {t.num_shard} and --num_replicate {t.num_replicate} must be >= 1")
    strategy = t.sharding_strategy
    if strategy == "HYBRID_SHARD":
        if has_shard:
            if t.num_replicate * t.num_shard != w:
                n = t.num_replicate * t.num_shard
                fixes = []
                if not has_rep and w % t.num_shard == 0:
                    fixes.append(f"--num_replicate {w // t.num_shard}")
                if w % t.num_replicate == 0:
                    fixes.append(f"--num_shard {w // t.num_replicate}")
                fix = f"pass {' or '.join(fixes)}, or " if fixes else ""
                raise ConfigError(
                    f"--num_shard {t.num_shard} x --num_replicate {t.num_replicate} = {n} ranks, but the {src}; "
                    f"HYBRID_SHARD needs num_replicate x num_shard = world size: {fix}launch {n} processes"
                )
            return
        if has_rep:
            if w % t.num_replicate:
                raise ConfigError(
                    f"--num_replicate {t.num_replicate} does not divide the {src}; HYBRID_SHARD "
                    f"needs num_replicate x num_shard = world size: pass a divisor of {w}"
                )
            t.num_shard = w // t.num_replicate
            return
        shard = local_world_size if local_world_size and w % local_world_size == 0 else w
        t.num_replicate, t.num_shard = w // shard, shard
    elif strategy == "FULL_SHARD":
        if has_shard and t.num_shard != w:
            raise ConfigError(
                f"--sharding_strategy FULL_SHARD shards over every rank, but --num_shard is "
                f"{t.num_shard} and the {src}: pass --num_shard {w} or drop --num_shard "
                f"(or use --sharding_strategy HYBRID_SHARD with num_replicate x num_shard = {w})"
            )
        if has_rep and t.num_replicate != 1:
            raise ConfigError(
                f"--sharding_strategy FULL_SHARD has no replicate dimension, but --num_replicate "
                f"is {t.num_replicate}: drop it or use --sharding_strategy HYBRID_SHARD"
            )
        t.num_replicate, t.num_shard = 1, w
    elif strategy == "NO_SHARD":
        if has_shard and t.num_shard != 1:
            raise ConfigError(
                f"--sharding_strategy NO_SHARD keeps full parameters on every rank, but "
                f"--num_shard is {t.num_shard}: drop --num_shard or use HYBRID_SHARD/FULL_SHARD"
            )
        if has_rep and t.num_replicate != w:
            raise ConfigError(
                f"--sharding_strategy NO_SHARD replicates over every rank, but --num_replicate "
                f"is {t.num_replicate} and the {src}: drop --num_replicate"
            )
        t.num_replicate, t.num_shard = w, 1


# ---------------------------------------------------------------------------------------------- warnings
# Upstream arguments the trainer accepts but does not act on: FSDP2 prefetches on its own, and the
# ViT's 2-D RoPE variant is not built (the release uses the learned table).
NOT_APPLIED: frozenset[str] = frozenset({"backward_prefetch", "vit_rope"})


def unapplied_arguments(cfg: TrainConfig) -> list[str]:
    """Human-readable notes on given arguments that the current trainer ignores (for stderr)."""
    notes: list[str] = []
    defaults = TrainConfig()
    for section, cls in _SECTIONS:
        for f in dataclasses.fields(cls):
            if f.name not in cfg.given or f.name not in NOT_APPLIED:
                continue
            value = getattr(getattr(cfg, section), f.name)
            if value != getattr(getattr(defaults, section), f.name):
                notes.append(f"--{f.name} {value} is accepted but not applied by this trainer yet")
    t = cfg.training
    if t.finetune_from_ema and not t.resume_model_only:
        notes.append("--finetune_from_ema True has no effect without --resume_model_only True (as upstream)")
    return notes
