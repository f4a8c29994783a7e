"""The memory plan (issue #15 items 1 and 3): parameter counts from the configuration equal the model built on
``meta``; the plan's weight, gradient, AdamW and EMA bytes equal what the trainer's own build functions allocate
(tiny and mid, full and frozen, one process and two, with FSDP2's padding on three); its activation estimate is
within 25 % of the peak the CPU allocator reports for the mid preset; frozen parameters are bf16 without
gradients or optimizer state and training with them resumes exactly; a launch that will not fit stops before any
weight is read, naming the smallest change; ``bagel plan-memory``, ``--dry_run`` and the Dagster check."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch
from memory_probe import held_bytes, peak_allocated, training_parts
from packed_fixtures import small_fixture
from safetensors.torch import load_file
from train_fixtures import records, torchrun, train_args

from bagel_core.model import AutoEncoder, build_model, preset, save_model_dir
from bagel_core.model.config import BagelConfig
from bagel_core.model.parallelize import apply_activation_checkpointing
from bagel_core.model.synthetic import make_packed_batch, mixed_samples
from bagel_core.train.__main__ import cli
from bagel_core.train.distributed import init_distributed, shutdown
from bagel_core.train.memory import (
    GIB,
    FreezeFlags,
    MemoryInputs,
    PackShape,
    activation_bytes,
    ce_tokens_bound,
    meta_param_shapes,
    param_specs,
    plan_memory,
    shard_rows,
    state_bytes,
    tensor_plans,
)
from bagel_core.train.preflight import plan_for_arguments

STATE_KEYS = ("weights_trainable", "weights_frozen", "gradients", "optimizer", "optimizer_step", "ema")
OPTIONS = {
    "full": FreezeFlags(),
    "freeze_llm_vit": FreezeFlags(freeze_llm=True, freeze_vit=True),
    "freeze_und": FreezeFlags(freeze_und=True),
}


def _argv(name: str, flags: FreezeFlags) -> list[str]:
    argv = ["--model_preset", name, "--sharding_strategy", "FULL_SHARD"]
    return argv + [arg for f, on in dataclasses.asdict(flags).items() if on for arg in (f"--{f}", "True")]


# ---- parameters ------------------------------------------------------------------------------------------
def _variants() -> dict[str, BagelConfig]:
    out = {name: preset(name) for name in ("tiny", "mid", "small", "7b-layers", "7b-mot")}
    for module in ("Qwen2MoEDecoderLayer", "Qwen2DecoderLayer"):
        cfg = preset("tiny")
        cfg.llm.layer_module = module
        out[f"tiny {module}"] = cfg
    for branch in ("visual_gen", "visual_und"):
        out[f"tiny no {branch}"] = dataclasses.replace(preset("tiny"), **{branch: False})
    return out


@pytest.mark.parametrize("name", list(_variants()))
def test_parameter_table_from_the_config_equals_the_model_built_on_meta(name):
    cfg = _variants()[name]
    analytic = {s.name: s.shape for s in param_specs(cfg)}
    assert analytic == meta_param_shapes(cfg)


def test_7b_component_counts_are_the_released_ones():
    """model.md 7.4: 14,607,260,128 parameters; per component."""
    counts: dict[str, int] = {}
    for s in param_specs(preset("7b-mot")):
        counts[s.component] = counts.get(s.component, 0) + s.numel
    llm = ("LLM understanding expert", "LLM generation expert", "embed_tokens", "lm_head")
    assert sum(counts[c] for c in llm) == 14_141_252_608
    assert counts["LLM generation expert"] == 28 * 466_116_096 // 2 + 3584  # the MoT twins and norm_moe_gen
    assert counts["ViT"] == 402_552_736 and counts["connector"] == 16_980_992
    assert counts["generation adapters"] == 13_769_728 + 232_960 + 229_440
    assert counts["sin-cos tables"] == 32_241_664
    assert sum(counts.values()) == 14_607_260_128


@pytest.mark.parametrize(("rows", "shards"), [(5, 4), (64, 3), (152064, 8), (1, 4), (7, 7), (100, 16)])
def test_shard_rows_are_torch_chunk_sizes_padded_to_the_first(rows, shards):
    chunks = torch.arange(rows).chunk(shards)
    for rank in range(shards):
        padded, local = shard_rows(rows, shards, rank)
        assert padded == chunks[0].numel() and local == (chunks[rank].numel() if rank < len(chunks) else 0)


def test_frozen_parameters_are_exactly_those_the_freeze_flags_name():
    cfg = preset("7b-mot")
    und = {t.spec.name for t in tensor_plans(cfg, FreezeFlags(freeze_und=True)) if not t.trainable}
    assert "language_model.lm_head.weight" not in und and "language_model.model.embed_tokens.weight" in und
    assert all("_moe_gen" not in n for n in und) and any(n.startswith("vit_model.") for n in und)
    assert "connector.fc1.weight" in und and "language_model.model.norm.weight" in und
    llm = {t.spec.name for t in tensor_plans(cfg, FreezeFlags(freeze_llm=True)) if not t.trainable}
    assert {n for n in llm if not n.endswith("pos_embed")} == {
        s.name for s in param_specs(cfg) if s.name.startswith("language_model.")
    }
    dtypes = {t.dtype_bytes for t in tensor_plans(cfg, FreezeFlags(freeze_und=True)) if t.frozen_by == "freeze_und"}
    assert dtypes == {2}


# ---- bytes the trainer allocates ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_process():
    dist_info = init_distributed("FULL_SHARD")
    yield dist_info
    shutdown(dist_info)


def _check_held(name: str, flags: FreezeFlags, got: dict, num_shard: int, rank: int) -> None:
    plans = tensor_plans(preset(name), flags)
    planned = state_bytes(plans, num_shard, rank)
    assert {k: got[k] for k in STATE_KEYS} == dataclasses.asdict(planned), (name, flags, rank)
    trainable = {t.spec.name for t in plans if t.trainable}
    assert set(got["trainable"]) == trainable and set(got["with_grad"]) == trainable  # no gradient when frozen
    assert got["optimizer_params"] == len(trainable)  # no AdamW state when frozen
    for t in plans:
        want = {True: "torch.float32", False: "torch.bfloat16" if t.frozen_by != "table" else "torch.float32"}
        assert got["dtypes"][t.spec.name] == want[t.trainable] == got["ema_dtypes"][t.spec.name], t.spec.name
    assert math.isfinite(got["loss"])


@pytest.mark.parametrize("name", ["tiny", "mid"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_planned_state_bytes_equal_what_one_process_allocates(one_process, name, option):
    flags = OPTIONS[option]
    got = held_bytes(*training_parts(_argv(name, flags), one_process), one_process)
    _check_held(name, flags, got, num_shard=1, rank=0)


@pytest.mark.parametrize("name", ["tiny", "mid"])
def test_planned_state_bytes_equal_what_a_lora_run_allocates(one_process, name):
    """LoRA (rank 4, every expert's attention and MLP): the base frozen in bf16, fp32 adapters with gradients and
    AdamW state, an EMA of the adapters only; the plan's bytes are the trainer's."""
    from bagel_core.train.lora import LoRA, parse_target

    lora = LoRA(rank=4, target=parse_target("all"))
    argv = [*_argv(name, FreezeFlags()), "--lora_rank", "4", "--lora_target", "all"]
    got = held_bytes(*training_parts(argv, one_process), one_process)
    plans = tensor_plans(preset(name), FreezeFlags(), lora.memory_spec(preset(name).llm))
    planned = state_bytes(plans, 1, 0, ema_frozen=False)
    assert {k: got[k] for k in STATE_KEYS} == dataclasses.asdict(planned)
    adapters = sum(1 for p in plans if p.trainable)
    assert len(got["trainable"]) == len(got["with_grad"]) == got["optimizer_params"] == adapters > 0
    assert all(".lora_A." in n or ".lora_B." in n for n in got["trainable"])
    assert math.isfinite(got["loss"])


def _probe(tmp_path: Path, nproc: int, cases: list[tuple[str, FreezeFlags]]) -> list[list[dict]]:
    os.environ["MEM_PROBE_ARGS"] = json.dumps([_argv(name, flags) for name, flags in cases])
    os.environ["MEM_PROBE_OUT"] = str(tmp_path / "out")
    try:
        result = torchrun(nproc, [], tmp_path, module="memory_probe", timeout=600)
    finally:
        os.environ.pop("MEM_PROBE_ARGS")
        os.environ.pop("MEM_PROBE_OUT")
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in range(nproc)]


def test_planned_state_bytes_equal_what_each_of_two_ranks_allocates(tmp_path):
    cases = [(name, OPTIONS[o]) for name in ("tiny", "mid") for o in ("full", "freeze_und")]
    per_rank = _probe(tmp_path, 2, cases)
    for rank, results in enumerate(per_rank):
        for (name, flags), got in zip(cases, results, strict=True):
            _check_held(name, flags, got, num_shard=2, rank=rank)


def test_padding_of_uneven_shards_on_three_ranks(tmp_path):
    """tiny's 64-wide tensors split 22/22/20 over three ranks: every rank holds padded 22-row weights, gradients
    and EMA, and AdamW state of its own rows only."""
    per_rank = _probe(tmp_path, 3, [("tiny", FreezeFlags())])
    for rank, (got,) in enumerate(per_rank):
        _check_held("tiny", FreezeFlags(), got, num_shard=3, rank=rank)
    first, last = per_rank[0][0], per_rank[2][0]
    assert first["weights_trainable"] == last["weights_trainable"] and first["optimizer"] > last["optimizer"]


# ---- activations -----------------------------------------------------------------------------------------------
ACTIVATION_PACKS = {
    # every branch: T2I, VLM and editing samples (about 1800 tokens, 65 CE tokens)
    "mixed": mixed_samples(2048, image_side=16, text_len=64),
    # CE-heavy text: the logits dominate (about 1000 tokens, 240 CE tokens)
    "text": [[("text", 60, True), ("text", 190, False)]] * 4,
}


def _measure(cfg: BagelConfig, samples: list, checkpointing: bool) -> tuple[int, PackShape]:
    torch.manual_seed(0)
    model = build_model(cfg)
    # embed_tokens and lm_head get no gradient here: their full-vocabulary weight gradients belong to the plan's
    # "gathered units in flight" row under FSDP, not to the activations this compares
    model.language_model.model.embed_tokens.requires_grad_(False)
    model.language_model.lm_head.requires_grad_(False)
    if checkpointing:
        apply_activation_checkpointing(model)
    for p in model.parameters():  # free each weight gradient at once, as FSDP's reduce-scatter does
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    batch = make_packed_batch(cfg, samples, seed=1)

    def step() -> None:
        terms = model(**batch, noise_generator=torch.Generator().manual_seed(0))
        sum(t.sum() for t in (terms.ce, terms.mse) if t is not None).backward()

    shape = PackShape(
        tokens=batch["sequence_length"],
        ce=batch["ce_loss_indexes"].numel() if "ce_loss_indexes" in batch else 0,
        vit=batch["packed_vit_tokens"].shape[0] if "packed_vit_tokens" in batch else 0,
        vae=batch["packed_vae_token_indexes"].numel() if "packed_vae_token_indexes" in batch else 0,
        mse=batch["mse_loss_indexes"].numel() if "mse_loss_indexes" in batch else 0,
        longest_doc=max(batch["sample_lens"]),
    )
    return peak_allocated(step), shape


@pytest.mark.parametrize(
    ("pack", "checkpointing"), [("mixed", False), ("mixed", True), ("text", True)], ids=["mixed", "mixed-ac", "text-ac"]
)
def test_activation_estimate_within_25_percent_of_the_measured_cpu_peak(pack, checkpointing):
    """The peak of everything torch allocates during forward + backward of the mid preset (fp32, CPU, the
    sdpa kernels), against the plan's estimate for the same pack."""
    cfg = preset("mid")
    measured, shape = _measure(cfg, ACTIVATION_PACKS[pack], checkpointing)
    planned = activation_bytes(cfg, shape, 4, checkpointing, "sdpa").peak
    print(f"{pack} ac={checkpointing}: {shape} measured {measured / 2**20:.1f} MiB, planned {planned / 2**20:.1f} MiB")
    assert abs(planned - measured) <= 0.25 * measured, (planned, measured)


def test_checkpointing_and_fewer_ce_tokens_lower_the_estimate():
    cfg, n = preset("7b-mot"), 11520
    full = activation_bytes(cfg, PackShape(n, ce=n), 2, False, "flex")
    ac = activation_bytes(cfg, PackShape(n, ce=n), 2, True, "flex")
    few = activation_bytes(cfg, PackShape(n, ce=1000), 2, True, "flex")
    assert full.peak > 4 * ac.peak and ac.logits == 12 * 152064 * n and few.peak < ac.peak / 3


# ---- verdicts and changes ---------------------------------------------------------------------------------------
def _release(**over) -> MemoryInputs:
    base = {
        "model": preset("7b-mot"),
        "max_num_tokens": 11520,
        "max_num_tokens_per_sample": 10240,
        "device_memory": 80 * GIB,
        "num_workers": 1,
        "sharding_strategy": "HYBRID_SHARD",
    }
    return MemoryInputs(**{**base, **over})


def test_offload_and_freezing_move_or_remove_what_the_plan_counts():
    full = plan_memory(_release(nproc_per_node=4, num_shard=4), search=False)
    offload = plan_memory(_release(nproc_per_node=4, num_shard=4, cpu_offload=True), search=False)
    frozen = plan_memory(_release(nproc_per_node=4, num_shard=4, freeze=FreezeFlags(freeze_und=True)), search=False)
    for key in ("weights_trainable", "gradients", "optimizer", "ema"):
        assert offload.row(key).device == 0 < full.row(key).device
    assert offload.row("host_offload").host > 4 * full.row("weights_trainable").device
    assert frozen.row("optimizer").device < 0.55 * full.row("optimizer").device
    assert frozen.row("weights_frozen").device > 0 and frozen.row("ema").device < full.row("ema").device


def test_a_plan_that_does_not_fit_names_a_change_that_fits():
    plan = plan_memory(_release(nproc_per_node=1, num_shard=1))
    assert not plan.fits and plan.change is not None and plan.verdict.startswith("does not fit; fits only with")
    assert plan_memory(plan.change.inputs, search=False).fits
    no_ac = plan_memory(_release(nproc_per_node=8, num_shard=8, attn_backend="flex", activation_checkpointing=False))
    assert not no_ac.fits and no_ac.change.flags == ("--activation_checkpointing True",)
    assert "smallest change: --activation_checkpointing True" in no_ac.table()


def test_plan_ce_tokens_from_token_statistics(tmp_path):
    import polars as pl

    stats = tmp_path / "token_stats.parquet"
    pl.DataFrame(
        {
            "ce_tokens": [0, 30, 10],
            "total_tokens_min": [500, 300, 40],
            "variant_cfg_text": [[20], [0], [20, 10]],
            "variant_cfg_vit": [[0], [0], [0]],
            "variant_cfg_vae": [[0], [0], [0]],
        }
    ).write_parquet(stats)
    assert ce_tokens_bound(stats, 1000) == 500  # 10 of 40 - 20 droppable tokens: half of any pack
    # what `bagel data stats` writes: per variant, the tokens of each item CFG dropout can remove
    pl.DataFrame(
        {
            "ce_tokens": [10, 0],
            "total_tokens_min": [40, 4624],
            "variant_cfg_text": [[[5, 5], [20]], [[10], [11]]],
            "variant_cfg_vit": [[[]], [[514]]],
            "variant_cfg_vae": [[[]], [[2050]]],
        },
        schema_overrides={
            c: pl.List(pl.List(pl.Int64)) for c in ("variant_cfg_text", "variant_cfg_vit", "variant_cfg_vae")
        },
    ).write_parquet(stats)
    assert ce_tokens_bound(stats, 1000) == 500
    pl.DataFrame({"ce_tokens": [1]}).write_parquet(stats)
    assert ce_tokens_bound(stats, 1000) is None


# ---- launches -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return small_fixture(tmp_path_factory.mktemp("memory") / "data")


def test_a_launch_that_will_not_fit_stops_before_any_weight_is_read(fx, tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    cfg = preset("tiny")
    save_model_dir(tmp_path / "hf", build_model(cfg), vae=AutoEncoder(cfg.vae), dtype=torch.float32)
    from bagel_core.train import build, trainer

    def never(*args, **kwargs):
        raise AssertionError("weights were read or models built")

    monkeypatch.setattr(build, "read_weights", never)
    monkeypatch.setattr(trainer, "build_models", never)
    argv = train_args(fx, tmp_path, model_path=tmp_path / "hf", device_memory_gb=2.5)
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "memory plan: does not fit; fits only with --" in err and "smallest change: --" in err
    assert "per GPU" in err and "plan-memory" in err and not (tmp_path / "results").exists()
    change = err.split("smallest change: ")[1].split(" (")[0].split()
    assert cli([*argv, *change, "--dry_run", "True"]) == 0  # the named change fits
    assert json.loads(capsys.readouterr().out)["plan"]["memory"]["fits"]
    assert cli([*argv, "--memory_check", "warn", "--dry_run", "True"]) == 0


def test_on_cpu_a_plan_over_host_ram_warns_unless_asked_to_refuse(fx, tmp_path, monkeypatch, capsys, caplog):
    from bagel_core.train import memory

    monkeypatch.setattr(memory, "detect_host_memory", lambda: 2 * GIB)  # less than 2 GiB per process allowance
    argv = [*train_args(fx, tmp_path), "--dry_run", "True"]
    assert cli(argv) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]["memory"]
    assert not plan["fits"] and "needs" in caplog.text and "host RAM per node" in caplog.text
    assert cli([*argv, "--memory_check", "error"]) == 2
    assert "does not fit" in capsys.readouterr().err


def test_dry_run_prints_the_memory_table(fx, tmp_path, capsys):
    assert cli([*train_args(fx, tmp_path), "--dry_run", "True"]) == 0
    captured = capsys.readouterr()
    memory = json.loads(captured.out)["plan"]["memory"]
    assert memory["fits"] and memory["verdict"] == "fits" and memory["table"][-1].startswith("note:")
    assert "memory plan: preset tiny" in captured.err and "verdict: fits" in captured.err
    assert "AdamW exp_avg + exp_avg_sq, fp32" in captured.err


def test_bagel_plan_memory_command(capsys):
    from test_train_args import FINETUNE_42, _command

    from bagel_core.cli import main

    _, per_node, argv = _command(FINETUNE_42)
    argv = [a if a != "8" else "4" for a in argv]  # --num_shard 8 -> 4: the guide's own mistake (test_train_args)
    common = ["plan-memory", "--nproc_per_node", str(per_node), "--device_memory_gb", "80"]
    assert main([*common, *argv]) == 1
    out = capsys.readouterr().out
    assert "memory plan: models/BAGEL-7B-MoT (14.607 B parameters" in out and "mesh 1 x 4" in out
    assert "verdict: does not fit; fits only with" in out and "smallest change: --" in out
    assert main([*common, "--json", *argv, "--cpu_offload", "True", "--freeze_und", "True", "--use_flex", "True"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] and plan["rows_gib"]["optimizer"]["device"] == 0 and plan["host_peak_gib"] > 100
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", "x", "--out", "y", "--bogus"])  # other commands still refuse strangers


def test_plan_for_arguments_is_what_the_dagster_check_uses(tmp_path):
    from assets.resources import TrainingLaunch
    from assets.training import memory_plan_check

    launch = TrainingLaunch(nproc_per_node=8, device_memory_gb=64)
    args = ["--model_path", str(tmp_path / "absent"), "--max_num_tokens", "11520", "--expected_num_tokens", "10240",
            "--max_num_tokens_per_sample", "10240", "--use_flex", "True", *launch.memory_args()]  # fmt: skip
    result = memory_plan_check(args, launch)
    assert not result.passed and "smallest change" in result.metadata["problem"].value
    ok = memory_plan_check([*args, "--plan_ce_tokens", "1024"], launch)
    assert ok.passed and ok.metadata["verdict"].value == "fits", ok.metadata
    direct = plan_for_arguments([*args, "--plan_ce_tokens", "1024"], 1, 8)
    assert round(direct.device_peak / GIB, 2) == ok.metadata["device_peak_gib"].value
    k8s = TrainingLaunch(backend="k8s", nproc_per_node=8)
    assert memory_plan_check(["--model_preset", "7b-mot", "--max_num_tokens_per_sample", "11520"], k8s).passed


# ---- training with frozen parameters ----------------------------------------------------------------------------
def test_training_with_freeze_und_is_finite_and_resumes_exactly(fx, tmp_path):
    over = {"freeze_und": True, "lr": 3e-3}
    assert cli(train_args(fx, tmp_path / "a", total_steps=4, **over)) == 0
    assert cli(train_args(fx, tmp_path / "b", total_steps=2, **over)) == 0
    assert cli(train_args(fx, tmp_path / "b", total_steps=4, auto_resume=True, **over)) == 0
    a, b = records(tmp_path / "a" / "results"), records(tmp_path / "b" / "results")
    assert all(math.isfinite(a[s]["loss"]) for s in a) and [a[s]["loss"] for s in range(1, 5)] == [
        b[s]["loss"] for s in range(1, 5)
    ]
    wa = load_file(str(tmp_path / "a" / "ckpt" / "step_final" / "ema.safetensors"))
    wb = load_file(str(tmp_path / "b" / "ckpt" / "step_final" / "ema.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_training_run_declares_the_blocking_memory_check():
    from assets.training import MEMORY_CHECK, training_run

    specs = {spec.name: spec for spec in training_run.check_specs}
    assert specs[MEMORY_CHECK].blocking
