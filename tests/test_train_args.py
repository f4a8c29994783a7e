"""Upstream-compatible training arguments: the guides' real commands, spellings, prefixes, checks."""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from bagel_core.config.errors import ConfigError
from bagel_core.train.__main__ import cli
from bagel_core.train.args import (
    OURS,
    DataArguments,
    ModelArguments,
    TrainConfig,
    TrainingArguments,
    check_world_size,
    parse_args,
    unapplied_arguments,
)

SEEDS = Path("/work/shared/seeds")

# Copied verbatim from /work/shared/seeds/000_0ec89b6de3c0d365.txt, "1. 预训练模式" (pre-training).
PRETRAIN = r"""torchrun \
--nnodes=$num_nodes \
--node_rank=$node_rank \
--nproc_per_node=8 \
--master_addr=$master_addr \
--master_port=$master_port \
train/pretrain_unified_navit.py \
--dataset_config_file ./data/configs/example.yaml \
--llm_path $llm_path \
--vae_path $vae_path \
--vit_path $vit_path \
--layer_module Qwen2MoTDecoderLayer \
--use_flex True \
--resume_from $resume_from \
--results_dir $output_path \
--checkpoint_dir $ckpt_path \
--max_latent_size 64 # 低分辨率预训练可设为32"""

# Copied verbatim from /work/shared/seeds/001_28b6a132c35ca6e8.txt, "4.1 单GPU微调命令" (one GPU).
FINETUNE_41 = r"""CUDA_VISIBLE_DEVICES=0 PYTHONPATH=. CUDA_VISIBLE_DEVICES=0 torchrun \
  --nnodes=1 \
  --node_rank=0 \
  --nproc_per_node=1 \
  --master_addr=localhost \
  --master_port=29500 \
  train/pretrain_unified_navit.py \
  --num_shard 1 \
  --dataset_config_file ./data/configs/example.yaml \
  --model_path models/BAGEL-7B-MoT \
  --layer_module Qwen2MoTDecoderLayer \
  --max_latent_size 64 \
  --finetune_from_hf True \
  --auto_resume True \
  --resume-model-only True \
  --finetune-from-ema True \
  --log_every 1 \
  --lr 2e-5 \
  --num_worker 1 \
  --expected_num_tokens 10240 \
  --max_num_tokens 11520 \
  --max_num_tokens_per_sample 10240 \
  --results_dir ./results \
  --checkpoint_dir ./results/checkpoints \
  --total_steps 10000 \
  --save_every 1000 \
  --warmup_steps 500"""

# Copied verbatim from /work/shared/seeds/001_28b6a132c35ca6e8.txt, "4.2 多GPU微调命令" (4 GPUs, --num_shard 8).
FINETUNE_42 = r"""PYTHONPATH=. CUDA_VISIBLE_DEVICES=0,1,2,3 torchrun \
  --nnodes=1 \
  --node_rank=0 \
  --nproc_per_node=4 \
  --master_addr=localhost \
  --master_port=29500 \
  train/pretrain_unified_navit.py \
  --num_shard 8 \
  --dataset_config_file ./data/configs/example.yaml \
  --model_path models/BAGEL-7B-MoT \
  --layer_module Qwen2MoTDecoderLayer \
  --max_latent_size 64 \
  --finetune_from_hf True \
  --auto_resume True \
  --resume-model-only True \
  --finetune-from-ema True \
  --log_every 10 \
  --lr 2e-5 \
  --num_worker 4 \
  --expected_num_tokens 10240 \
  --max_num_tokens 11520 \
  --max_num_tokens_per_sample 10240 \
  --results_dir ./results \
  --checkpoint_dir ./results/checkpoints \
  --total_steps 50000 \
  --save_every 2000 \
  --warmup_steps 2000"""

# Copied verbatim from /work/shared/seeds/001_28b6a132c35ca6e8.txt, "4.3 多节点训练命令" node 0 (2 x 8 GPUs).
FINETUNE_43 = r"""PYTHONPATH=. torchrun \
  --nnodes=2 \
  --node_rank=0 \
  --nproc_per_node=8 \
  --master_addr=<主节点IP> \
  --master_port=29500 \
  train/pretrain_unified_navit.py \
  --dataset_config_file ./data/configs/example.yaml \
  --model_path models/BAGEL-7B-MoT \
  --layer_module Qwen2MoTDecoderLayer \
  --max_latent_size 64 \
  --finetune_from_hf True \
  --auto_resume True \
  --resume-model-only True \
  --finetune-from-ema True \
  --lr 2e-5 \
  --num_worker 8 \
  --expected_num_tokens 10240 \
  --max_num_tokens 11520 \
  --max_num_tokens_per_sample 10240"""

PLACEHOLDERS = {
    "num_nodes": "1",
    "node_rank": "0",
    "master_addr": "127.0.0.1",
    "master_port": "29500",
    "llm_path": "/ckpt/Qwen2.5-0.5B-Instruct",
    "vae_path": "/ckpt/flux/ae.safetensors",
    "vit_path": "/ckpt/siglip-so400m-14-980-flash-attn2-navit",
    "resume_from": "/ckpt/resume/0002000",
    "output_path": "/out/results",
    "ckpt_path": "/out/checkpoints",
}


def _command(text: str, **subst: str) -> tuple[int, int, list[str]]:
    """(world size, GPUs per node, our argv) of a guide's command: the shell's line continuations and
    comments, ``$var`` placeholders substituted, only ``train/pretrain_unified_navit.py`` replaced."""
    values = {**PLACEHOLDERS, **subst}
    text = re.sub(r"\$(\w+)", lambda m: values[m.group(1)], text.replace("\\\n", " "))
    tokens = shlex.split(text, comments=True)
    i = tokens.index("train/pretrain_unified_navit.py")
    launcher = dict(t[2:].split("=", 1) for t in tokens[:i] if t.startswith("--"))
    per_node = int(launcher["nproc_per_node"])
    return int(launcher["nnodes"]) * per_node, per_node, tokens[i + 1 :]


# ---- the guides' commands ------------------------------------------------------------------------------
@pytest.mark.skipif(not SEEDS.is_dir(), reason="seed guides not available")
def test_commands_are_verbatim_copies_of_the_guides():
    pretrain = (SEEDS / "000_0ec89b6de3c0d365.txt").read_text()
    finetune = (SEEDS / "001_28b6a132c35ca6e8.txt").read_text()
    assert PRETRAIN in pretrain
    for cmd in (FINETUNE_41, FINETUNE_42, FINETUNE_43):
        assert cmd in finetune


def test_pretrain_command(monkeypatch):
    world, per_node, argv = _command(PRETRAIN)
    assert (world, argv[-2:]) == (8, ["--max_latent_size", "64"])  # the trailing comment is shell's
    monkeypatch.setenv("WORLD_SIZE", str(world))
    cfg = parse_args(argv)
    m, d, t = cfg.model, cfg.data, cfg.training
    assert d.dataset_config_file == "./data/configs/example.yaml"
    assert (m.llm_path, m.vae_path, m.vit_path) == (
        PLACEHOLDERS["llm_path"],
        PLACEHOLDERS["vae_path"],
        PLACEHOLDERS["vit_path"],
    )
    assert m.layer_module == "Qwen2MoTDecoderLayer" and m.max_latent_size == 64
    assert t.use_flex is True and m.attn_backend == "flex"
    assert t.resume_from == PLACEHOLDERS["resume_from"] and t.auto_resume is False
    assert (t.results_dir, t.checkpoint_dir) == ("/out/results", "/out/checkpoints")
    assert (t.num_replicate, t.num_shard, t.sharding_strategy) == (1, 8, "HYBRID_SHARD")
    assert d.num_workers == 4 and t.lr == 1e-4 and t.total_steps == 500_000

    # two nodes: upstream's default mesh 1 x 8 would not fit 16 ranks; ours derives 2 x 8 from GPUs per node
    world, per_node, argv = _command(PRETRAIN, num_nodes="2")
    cfg = parse_args(argv, world_size=world, local_world_size=per_node)
    assert (cfg.training.num_replicate, cfg.training.num_shard) == (2, 8)


def test_finetune_41_single_gpu(monkeypatch):
    world, _, argv = _command(FINETUNE_41)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    cfg = parse_args(argv)
    m, d, t = cfg.model, cfg.data, cfg.training
    assert world == 1 and (t.num_shard, t.num_replicate) == (1, 1)
    assert m.model_path == "models/BAGEL-7B-MoT" and m.max_latent_size == 64
    assert t.finetune_from_hf and t.auto_resume and t.resume_model_only and t.finetune_from_ema
    assert t.resume_from is None  # 4.1 gives no --resume-from
    assert (t.log_every, t.lr, d.num_workers) == (1, 2e-5, 1)  # --num_worker 1 is --num_workers 1
    assert (t.expected_num_tokens, d.max_num_tokens, d.max_num_tokens_per_sample) == (10240, 11520, 10240)
    assert (t.results_dir, t.checkpoint_dir) == ("./results", "./results/checkpoints")
    assert (t.total_steps, t.save_every, t.warmup_steps) == (10000, 1000, 500)
    assert m.attn_backend == "sdpa" and t.use_flex is False
    given = {"num_shard", "finetune_from_hf", "resume_model_only", "finetune_from_ema", "num_workers"}
    assert given <= cfg.given and "num_replicate" not in cfg.given


def test_finetune_42_num_shard_8_on_4_gpus_is_an_error(monkeypatch, capsys):
    world, _, argv = _command(FINETUNE_42)
    assert world == 4 and argv[:2] == ["--num_shard", "8"]
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(ConfigError, match=r"--num_shard 8 .*world size 4.*--num_shard 4"):
        parse_args(argv)
    assert cli(argv + ["--dry_run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--num_shard 8" in err and "world size 4" in err
    # on 8 ranks the same command is valid
    monkeypatch.setenv("WORLD_SIZE", "8")
    cfg = parse_args(argv)
    assert (cfg.training.num_shard, cfg.data.num_workers, cfg.training.log_every) == (8, 4, 10)
    assert (cfg.training.total_steps, cfg.training.save_every, cfg.training.warmup_steps) == (50000, 2000, 2000)


def test_finetune_43_two_nodes(monkeypatch):
    world, per_node, argv = _command(FINETUNE_43)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(per_node))
    cfg = parse_args(argv)
    assert (world, cfg.training.num_replicate, cfg.training.num_shard) == (16, 2, 8)
    assert cfg.data.num_workers == 8 and cfg.training.log_every == 10


# ---- spellings, booleans, prefixes ------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv", [["--num_worker", "1"], ["--num-worker", "1"], ["--num_workers=1"], ["--num_w=1"], ["--num-workers", "1"]]
)
def test_num_worker_prefix_and_spellings(argv):
    cfg = parse_args(argv)
    assert cfg.data.num_workers == 1 and "num_workers" in cfg.given


def test_dash_spelling_equals_underscore():
    a = parse_args(
        [
            "--resume-model-only",
            "True",
            "--max-latent-size",
            "64",
            "--lr-scheduler=cosine",
            "--resume-from",
            "/ckpt/x",
            "--vit-select-layer",
            "-1",
        ]
    )
    b = parse_args(
        [
            "--resume_model_only",
            "True",
            "--max_latent_size",
            "64",
            "--lr_scheduler=cosine",
            "--resume_from",
            "/ckpt/x",
            "--vit_select_layer",
            "-1",
        ]
    )
    assert a == b and a.training.resume_model_only and a.model.max_latent_size == 64
    assert a.training.lr_scheduler == "cosine" and a.model.vit_select_layer == -1


@pytest.mark.parametrize(
    "argv,value",
    [
        (["--use_flex"], True),
        (["--use_flex", "True"], True),
        (["--use_flex", "true"], True),
        (["--use_flex", "1"], True),
        (["--use_flex", "yes"], True),
        (["--use-flex=True"], True),
        (["--use_flex", "False"], False),
        (["--use_flex=false"], False),
        (["--use_flex", "0"], False),
        (["--use_flex", "--lr", "1e-3"], True),
        ([], False),
    ],
)
def test_bool_forms(argv, value):
    assert parse_args(argv).training.use_flex is value


def test_bool_with_true_default_and_no_flag():
    assert parse_args(["--visual_gen", "False"]).training.visual_gen is False
    assert parse_args(["--no_visual_gen"]).training.visual_gen is False
    assert parse_args(["--no-freeze-vae"]).training.freeze_vae is False
    assert parse_args(["--activation_checkpointing", "False"]).training.activation_checkpointing is False
    with pytest.raises(ConfigError, match="visual_gen"):
        parse_args(["--visual_gen", "maybe"])


def test_unknown_argument_suggests_the_closest_name(capsys):
    with pytest.raises(ConfigError, match=r"unknown argument --num_shards \(did you mean --num_shard"):
        parse_args(["--num_shards", "2"])
    with pytest.raises(ConfigError, match="did you mean --wandb_project"):
        parse_args(["--wandb-projct", "x"])
    with pytest.raises(ConfigError, match="unexpected value 'extra'"):
        parse_args(["--lr", "1e-4", "extra"])
    assert cli(["--lr_schedular", "cosine"]) == 2
    assert "did you mean --lr_scheduler" in capsys.readouterr().err


def test_ambiguous_prefix_is_an_error():
    with pytest.raises(ConfigError, match="ambiguous option --max_num_token:.*--max_num_tokens_per_sample"):
        parse_args(["--max_num_token", "5"])
    with pytest.raises(ConfigError, match="ambiguous option --freeze_v:.*--freeze_vit.*--freeze_vae"):
        parse_args(["--freeze_v"])
    with pytest.raises(ConfigError, match="ambiguous option --visual"):
        parse_args(["--visual", "False"])


def test_prefixes_resolve_as_upstream():
    # upstream resolves --model to --model_path and --dataset to --dataset_config_file: our --model_preset and
    # --dataset_info do not make them ambiguous; a prefix of both spellings of one argument is not ambiguous
    cfg = parse_args(
        ["--model", "/m", "--dataset", "g.yaml", "--save", "5", "--model_pre", "small", "--dataset_i", "r.yaml"]
    )
    assert (cfg.model.model_path, cfg.data.dataset_config_file, cfg.training.save_every) == ("/m", "g.yaml", 5)
    assert (cfg.model.model_preset, cfg.data.dataset_info) == ("small", "r.yaml")


def test_our_aliases_and_fields():
    cfg = parse_args(
        [
            "--registry_file",
            "r.yaml",
            "--manifest_dir",
            "m",
            "--keep_last_k",
            "3",
            "--dry_run",
            "--attn_backend",
            "flex",
            "--model_preset",
            "small",
        ]
    )
    assert (cfg.data.dataset_info, cfg.data.manifest, cfg.training.keep_last_k) == ("r.yaml", "m", 3)
    assert cfg.training.dry_run and cfg.model.attn_backend == "flex" and cfg.model.model_preset == "small"
    assert parse_args(["--dataset_info", "a.yaml", "--manifest", "d"]).data.manifest == "d"


@pytest.mark.parametrize("raw", ["None", "none", ""])
def test_resume_from_none(raw):
    assert parse_args(["--resume_from", raw]).training.resume_from is None


# ---- values and world size -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv,pattern",
    [
        (["--lr_scheduler", "linear"], r"--lr_scheduler 'linear'.*constant, cosine"),
        (["--sharding_strategy", "HYBRID"], r"--sharding_strategy 'HYBRID'.*--sharding_strategy HYBRID_SHARD"),
        (["--sharding_strategy", "SHARD_GRAD_OP"], r"first checkpoint save"),
        (["--attn_backend", "xformers"], r"--attn_backend 'xformers'.*sdpa, flex, flash"),
        (["--use_flex", "True", "--attn_backend", "sdpa"], r"--use_flex True .*--attn_backend"),
        (["--keep_last_k", "-1"], r"--keep_last_k -1 must be >= 0"),
        (["--save_every", "0"], r"--save_every 0 must be > 0"),
        (["--log_every", "-5"], r"--log_every -5 must be > 0"),
        (["--layer_module", "Qwen2MoT"], r"--layer_module 'Qwen2MoT'.*Qwen2MoTDecoderLayer"),
        (["--model_preset", "huge"], r"--model_preset 'huge'"),
        (["--expected_num_tokens", "40000"], r"--expected_num_tokens 40000 exceeds --max_num_tokens 36864"),
        (["--visual_gen", "False", "--visual_und", "False"], r"nothing to train"),
        (["--lr", "abc"], r"--lr: invalid float value"),
    ],
)
def test_value_errors_name_the_flag(argv, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_args(argv)


def test_all_value_problems_reported_together():
    with pytest.raises(ConfigError) as e:
        parse_args(["--lr_scheduler", "linear", "--keep_last_k", "-1", "--save_every", "0"])
    assert all(s in str(e.value) for s in ("--lr_scheduler", "--keep_last_k", "--save_every"))


def test_world_size_rules(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert (parse_args([]).training.num_replicate, parse_args([]).training.num_shard) == (1, 1)
    cfg = parse_args(["--num_replicate", "2"], world_size=8)
    assert (cfg.training.num_replicate, cfg.training.num_shard) == (2, 4)
    assert parse_args(["--num_replicate", "2", "--num_shard", "4"], world_size=8).training.num_shard == 4
    with pytest.raises(ConfigError, match=r"--num_shard 4 x --num_replicate 2 = 8 ranks, but the world size 4"):
        parse_args(["--num_replicate", "2", "--num_shard", "4"], world_size=4)
    with pytest.raises(ConfigError, match=r"--num_replicate 3 does not divide the world size 8"):
        parse_args(["--num_replicate", "3"], world_size=8)
    with pytest.raises(ConfigError, match=r"pass --num_replicate 2 or --num_shard 8"):
        parse_args(["--num_shard", "4"], world_size=8)
    cfg = parse_args(["--sharding_strategy", "FULL_SHARD"], world_size=4)
    assert (cfg.training.num_replicate, cfg.training.num_shard) == (1, 4)
    with pytest.raises(ConfigError, match=r"FULL_SHARD .*--num_shard is 8 and the world size 4"):
        parse_args(["--sharding_strategy", "FULL_SHARD", "--num_shard", "8"], world_size=4)
    with pytest.raises(ConfigError, match=r"NO_SHARD .*--num_shard is 2"):
        parse_args(["--sharding_strategy", "NO_SHARD", "--num_shard", "2"], world_size=2)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE='two'"):
        parse_args([])


def test_check_world_size_on_a_built_config():
    cfg = TrainConfig(given=frozenset({"num_shard"}))
    with pytest.raises(ConfigError, match=r"= 8 ranks, but the world size 2"):
        check_world_size(cfg, 2)
    check_world_size(cfg, 8)
    fresh = TrainConfig()
    check_world_size(fresh, 2)
    assert (fresh.training.num_replicate, fresh.training.num_shard) == (1, 2)


# ---- defaults, fields, help, CLI ---------------------------------------------------------------------
UPSTREAM_FIELDS = {  # training.md section 2 (ModelArguments, DataArguments, TrainingArguments)
    ModelArguments: "model_path llm_path llm_qk_norm tie_word_embeddings layer_module vae_path vit_path "
    "max_latent_size latent_patch_size vit_patch_size vit_max_num_patch_per_side connector_act "
    "interpolate_pos vit_select_layer vit_rope text_cond_dropout_prob vae_cond_dropout_prob "
    "vit_cond_dropout_prob",
    DataArguments: "dataset_config_file prefetch_factor num_workers max_num_tokens_per_sample max_num_tokens "
    "prefer_buffer_before max_buffer_size data_seed",
    TrainingArguments: "visual_gen visual_und results_dir checkpoint_dir wandb_project wandb_name wandb_runid "
    "wandb_resume wandb_offline global_seed auto_resume resume_from resume_model_only "
    "finetune_from_ema finetune_from_hf log_every save_every total_steps warmup_steps "
    "lr_scheduler lr min_lr beta1 beta2 eps ema max_grad_norm timestep_shift mse_weight "
    "ce_weight ce_loss_reweighting expected_num_tokens gradient_accumulation_steps "
    "peak_device_tflops num_replicate num_shard sharding_strategy backward_prefetch "
    "cpu_offload freeze_llm freeze_vit freeze_vae freeze_und copy_init_moe use_flex",
}


def test_every_upstream_field_in_upstream_order():
    for cls, names in UPSTREAM_FIELDS.items():
        ours = [f.name for f in dataclasses.fields(cls) if f.name not in OURS]
        assert ours == names.split(), cls.__name__


def test_defaults_equal_upstream():
    m, d, t = ModelArguments(), DataArguments(), TrainingArguments()
    assert (m.model_path, m.llm_path, m.layer_module) == (
        "hf/BAGEL-7B-MoT",
        "hf/Qwen2.5-0.5B-Instruct/",
        "Qwen2MoTDecoderLayer",
    )
    assert (m.vae_path, m.vit_path) == ("flux/vae/ae.safetensors", "hf/siglip-so400m-14-980-flash-attn2-navit/")
    assert (m.llm_qk_norm, m.tie_word_embeddings, m.vit_select_layer, m.connector_act) == (
        True,
        False,
        -2,
        "gelu_pytorch_tanh",
    )
    assert (m.max_latent_size, m.text_cond_dropout_prob, m.vae_cond_dropout_prob) == (32, 0.1, 0.3)
    assert (d.dataset_config_file, d.num_workers, d.prefetch_factor, d.data_seed) == (
        "data/configs/example.yaml",
        4,
        2,
        42,
    )
    assert (d.max_num_tokens_per_sample, d.max_num_tokens, d.prefer_buffer_before, d.max_buffer_size) == (
        16384,
        36864,
        16384,
        50,
    )
    assert (t.wandb_project, t.wandb_name, t.wandb_runid, t.wandb_resume, t.wandb_offline) == (
        "bagel",
        "run",
        "0",
        "allow",
        False,
    )
    assert (t.global_seed, t.resume_from, t.eps, t.ema, t.beta2, t.min_lr) == (4396, None, 1e-15, 0.9999, 0.95, 1e-7)
    assert (t.num_replicate, t.num_shard, t.sharding_strategy, t.backward_prefetch, t.cpu_offload) == (
        1,
        8,
        "HYBRID_SHARD",
        "BACKWARD_PRE",
        False,
    )
    assert (t.freeze_llm, t.freeze_vit, t.freeze_vae, t.freeze_und, t.copy_init_moe, t.use_flex) == (
        False,
        False,
        True,
        False,
        True,
        False,
    )
    assert (t.gradient_accumulation_steps, t.peak_device_tflops, t.total_steps, t.save_every) == (1, 0.0, 500_000, 2000)


def test_help_lists_every_argument(capsys):
    with pytest.raises(SystemExit) as e:
        cli(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cls in (ModelArguments, DataArguments, TrainingArguments):
        for f in dataclasses.fields(cls):
            assert f"--{f.name}" in out, f.name
            assert f.metadata["help"].split()[0] in out
    for name in ("--registry_file", "--manifest_dir", "[bagel-pipeline]", "WORLD_SIZE"):
        assert name in out


def test_without_a_registry_the_error_says_how_to_make_one(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./data/dataset_info.py here either
    assert cli(["--dry_run", "True"]) == 2
    err = capsys.readouterr().err
    assert "--dataset_info" in err and "bagel data registry" in err and "data/dataset_info.py" in err


def test_unapplied_arguments_are_named():
    cfg = parse_args(["--vit_rope", "True", "--freeze_llm", "True"])
    notes = unapplied_arguments(cfg)
    assert any("--vit_rope" in n for n in notes) and not any("freeze_llm" in n for n in notes)


def test_to_dict_round_trip():
    cfg = parse_args(["--lr", "3e-4", "--dataset_info", "r.yaml"])
    d = cfg.to_dict()
    assert "given" not in d and d["training"]["lr"] == 3e-4 and d["data"]["dataset_info"] == "r.yaml"
    back = TrainConfig(ModelArguments(**d["model"]), DataArguments(**d["data"]), TrainingArguments(**d["training"]))
    assert back == cfg
