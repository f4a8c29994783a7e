"""LoRA with peft (``--lora_rank``): arguments and targets, what is frozen and in which dtype (tiny and 7B-MoT on
meta), training from a released-layout directory (the loss falls, only the adapters train), merged export for
``setup_models`` and the adapter-only export giving the unmerged model's outputs, model-only resume from the EMA
adapters, and a 2-process run killed mid-way that ``--auto_resume`` continues bit-exactly."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from packed_fixtures import small_fixture
from safetensors.torch import load_file
from train_fixtures import (
    full_state,
    kill_when_saved,
    records,
    torchrun,
    torchrun_env,
    train_args,
    trainer_session,
)

from bagel_core.config.errors import ConfigError
from bagel_core.data.tokenizer import load_tokenizer
from bagel_core.model import AutoEncoder, build_model, preset, save_model_dir
from bagel_core.model.checkpoint_io import expected_shapes
from bagel_core.model.qwen2_mot import Routing
from bagel_core.train.args import parse_args
from bagel_core.train.checkpoint import complete_steps, step_dir
from bagel_core.train.export import export_checkpoint, verify_checkpoint
from bagel_core.train.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoRA,
    adapter_parameters,
    apply_adapter,
    apply_lora,
    check_checkpoint,
    parameter_counts,
    parse_target,
)
from bagel_core.train.memory import param_specs


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return small_fixture(tmp_path_factory.mktemp("lora") / "data")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 'released' tiny model directory (bf16 like the release; a non-zero llm2vae as a trained model has)."""
    torch.manual_seed(11)
    cfg = preset("tiny")
    model = build_model(cfg)
    model.llm2vae.reset_parameters()
    tokenizer, _ = load_tokenizer(None)
    out = tmp_path_factory.mktemp("lora_base") / "base"
    return save_model_dir(out, model, vae=AutoEncoder(cfg.vae), tokenizer=tokenizer)


# ---- arguments, targets, what trains -------------------------------------------------------------------
def test_arguments_targets_and_errors():
    t = parse_args(["--lora_rank", "8"]).training
    assert LoRA.from_args(t) == LoRA(8, None, 0.0, ("gen_attn", "gen_mlp"))  # default: the generation expert
    assert LoRA.from_args(parse_args([]).training) == LoRA()  # rank 0: off
    assert LoRA.from_args(parse_args(["--lora_rank", "4", "--lora_alpha", "8"]).training).scaling == 2.0
    assert parse_target("all") == ("gen_attn", "gen_mlp", "und_attn", "und_mlp")
    assert parse_target("und_mlp, gen") == ("gen_attn", "gen_mlp", "und_mlp")
    with pytest.raises(ConfigError, match="unknown target 'attn'.*gen_attn, gen_mlp, und_attn, und_mlp"):
        parse_args(["--lora_rank", "4", "--lora_target", "attn"])
    with pytest.raises(ConfigError, match="--lora_rank -1 must be >= 0"):
        parse_args(["--lora_rank", "-1"])
    with pytest.raises(ConfigError, match="--lora_dropout 1.0 must be in"):
        parse_args(["--lora_dropout", "1"])
    with pytest.raises(ConfigError, match="--visual_gen False never runs"):
        parse_args(["--lora_rank", "4", "--visual_gen", "False"])
    with pytest.raises(ConfigError, match="--freeze_und True detaches"):
        parse_args(["--lora_rank", "4", "--lora_target", "und_attn", "--freeze_und", "True"])
    plain = dataclasses.replace(preset("tiny").llm, layer_module="Qwen2DecoderLayer")
    with pytest.raises(ConfigError, match="no gen_attn, gen_mlp projections"):
        LoRA(4).check(plain)


@pytest.mark.parametrize("name", ["tiny", "7b-mot"])
def test_only_the_adapters_train_and_the_base_is_bf16(name):
    cfg = preset(name)
    model = build_model(cfg, "meta")
    total_base = sum(p.numel() for p in model.parameters())
    lora = LoRA(16, None, 0.0, parse_target("gen_attn,gen_mlp"))
    apply_lora(model, lora, cfg.llm)
    trainable, total = parameter_counts(model)
    llm, r = cfg.llm, 16
    h, i = llm.hidden_size, llm.intermediate_size
    q, kv = llm.num_attention_heads * llm.head_dim, llm.num_key_value_heads * llm.head_dim
    per_layer = r * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h))
    assert trainable == llm.num_hidden_layers * per_layer and total == total_base + trainable
    if name == "7b-mot":  # 40.4 M adapter parameters on 14.6 B (0.28 %)
        assert trainable == 40_370_176 and total == 14_647_630_304
    for key, p in model.named_parameters():
        if ".lora_" in key:
            assert p.requires_grad and p.dtype == torch.float32, key
        else:
            table = key in ("vit_pos_embed.pos_embed", "latent_pos_embed.pos_embed")
            assert not p.requires_grad and p.dtype == (torch.float32 if table else torch.bfloat16), key
    # the memory plan's LoRA view counts exactly these adapters
    specs = lora.memory_spec(cfg.llm).adapter_specs(param_specs(cfg))
    assert sum(s.numel for s in specs) == trainable


# ---- train, export, merged == unmerged -----------------------------------------------------------------
def _hidden(model, n: int = 12) -> torch.Tensor:
    """Final hidden states, velocity and logits of a fixed sequence whose second half takes the generation
    expert (both experts and both adapters' paths run)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, model.cfg.llm.hidden_size, generator=g)
    route = Routing.from_gen_indexes(torch.arange(n // 2, n), n)
    with torch.no_grad():
        hidden = model.forward_cached(x, torch.arange(n), route, model.new_cache(), causal=True, update_cache=False)
        return torch.cat([hidden, model.llm2vae(hidden), model.language_model.lm_head(hidden)], dim=1)


def test_lora_trains_exports_merged_and_adapter_only(fx, base, tmp_path, capsys):
    from bagel_core.inference import setup_models
    from bagel_core.train.cli import add_parser

    argv = train_args(fx, tmp_path, model_path=base, total_steps=8, lr=2e-2, save_every=8, lora_rank=4)
    with trainer_session(argv) as tr:
        trainable = {k for k, p in tr.model.named_parameters() if p.requires_grad}
        assert trainable and all(".lora_A." in k or ".lora_B." in k for k in trainable)
        assert all("_moe_gen" in k for k in trainable)  # default targets: the generation expert only
        in_optimizer = {id(p) for group in tr.optimizer.param_groups for p in group["params"]}
        assert in_optimizer == {id(p) for p in tr.model.parameters() if p.requires_grad}
        assert set(full_state(tr.ema)) == {k.replace("_checkpoint_wrapped_module.", "") for k in trainable}
        before = full_state(tr.model)
        tr.run()
        after = full_state(tr.model)
    frozen = [k for k in before if ".lora_" not in k]
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert {before[k].dtype for k in frozen} == {torch.bfloat16, torch.float32}  # fp32: the sin-cos tables only
    recs = records(tmp_path / "results")
    mse = [recs[s]["mse"] for s in range(1, 9)]
    assert sum(mse[-3:]) / 3 < 0.9 * sum(mse[:3]) / 3, mse  # the generation adapters learn the velocity

    # step_final: merged EMA weights under the released names, loadable by setup_models
    final = tmp_path / "ckpt" / "step_final"
    merged_bf16 = load_file(str(final / "ema.safetensors"))
    assert {k: tuple(v.shape) for k, v in merged_bf16.items()} == expected_shapes(build_model(preset("tiny"), "meta"))
    assert not any("lora_" in k or "base_layer" in k for k in merged_bf16)
    setup_models(final, device="cpu", dtype=torch.float32)

    # merged (fp32 export) vs unmerged (base directory + peft adapters from --adapter-only)
    step = step_dir(tmp_path / "ckpt", 8)
    assert verify_checkpoint(step) == len(merged_bf16)  # the Dagster check's key/shape verification
    merged_dir = export_checkpoint(step, tmp_path / "merged", dtype=torch.float32)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(
        ["export", "--checkpoint", str(step), "--out", str(tmp_path / "adapter"), "--adapter-only"]
    )
    assert args.func(args) == 0
    assert "ema adapters, step 8" in capsys.readouterr().out
    adapter = tmp_path / "adapter"
    assert {p.name for p in adapter.iterdir()} == {ADAPTER_WEIGHTS, ADAPTER_CONFIG}
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    assert (
        config["r"] == 4 and config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(base.resolve())
    )
    tensors = load_file(str(adapter / ADAPTER_WEIGHTS))
    assert len(tensors) == len(trainable) and all(k.startswith("base_model.model.") for k in tensors)
    assert {v.dtype for v in tensors.values()} == {torch.float32}

    merged, *_ = setup_models(merged_dir, device="cpu", dtype=torch.float32)
    unmerged = apply_adapter(setup_models(base, device="cpu", dtype=torch.float32)[0], adapter)
    plain = setup_models(base, device="cpu", dtype=torch.float32)[0]
    out_merged, out_unmerged, out_base = _hidden(merged), _hidden(unmerged), _hidden(plain)
    diff = (out_merged - out_unmerged).abs().max().item()
    assert diff < 1e-4
    assert (out_merged - out_base).abs().max().item() > 1e3 * max(diff, 1e-7)  # the adapters do change the model
    n = out_base.shape[0] // 2  # the understanding tokens (first half) see no adapter: bit-identical to the base
    assert torch.equal(out_unmerged[:n], out_base[:n])
    # peft's own merge of the adapter gives the merged export
    peft_merged = apply_adapter(setup_models(base, device="cpu", dtype=torch.float32)[0], adapter, merged=True)
    assert (_hidden(peft_merged) - out_merged).abs().max().item() < 1e-4

    # model-only start from the LoRA step: base from the model, adapters from the EMA
    again = train_args(
        fx, tmp_path / "again", resume_from=step, resume_model_only=True, finetune_from_ema=True, lora_rank=4
    )
    with trainer_session(again) as tr:
        assert tr.step == 0
        model = full_state(tr.model)
    for key, value in tensors.items():
        module, matrix = key.removeprefix("base_model.model.").rsplit(".", 2)[:2]
        assert torch.equal(model[f"{module}.{matrix}.default.weight"], value), key
    # a LoRA checkpoint never feeds a run without the same adapters
    with pytest.raises(ConfigError, match="this run has no --lora_rank"):
        check_checkpoint(LoRA(), step, full_resume=True)
    with pytest.raises(ConfigError, match="pass --lora_rank 4"):
        check_checkpoint(LoRA(8), step, full_resume=False)


def test_lora_dry_run_and_a_full_checkpoint_into_lora_is_refused(fx, base, tmp_path):
    from bagel_core.train.__main__ import cli

    argv = train_args(fx, tmp_path, model_path=base, total_steps=1, lora_rank=4)
    assert cli([*argv, "--dry_run", "True"]) == 0
    done = tmp_path / "plain"
    (done / "step_1").mkdir(parents=True)
    (done / "step_1" / "train_state.json").write_text(json.dumps({"step": 1, "config": {"training": {}}}))
    with pytest.raises(ConfigError, match="has no LoRA adapters.*bagel export"):
        check_checkpoint(LoRA(4), done / "step_1", full_resume=False)


# ---- kill mid-run, auto_resume: bit-exact ----------------------------------------------------------------
def _check(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


@pytest.mark.slow  # three 2-rank torchrun launches (~65 s); the non-LoRA kill/resume runs in the default suite
def test_two_ranks_killed_mid_run_resume_bit_exactly(fx, base, tmp_path):
    # every expert and projection, with dropout: the RNG (dropout masks, recomputed under activation
    # checkpointing) must be restored as exactly as the adapters, their EMA and AdamW state
    common = {"model_path": base, "total_steps": 4, "save_every": 2, "lr": 1e-2}
    common.update(lora_rank=4, lora_alpha=8, lora_dropout=0.1, lora_target="all")
    _check(torchrun(2, train_args(fx, tmp_path / "straight", **common), tmp_path))
    run = tmp_path / "killed"
    argv = train_args(fx, run, auto_resume=True, **common)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "bagel_core.train", *argv]
    assert kill_when_saved(command, torchrun_env(tmp_path), run / "ckpt", 2) != 0
    assert complete_steps(run / "ckpt") == [2]
    _check(torchrun(2, argv, tmp_path))
    want, got = records(tmp_path / "straight" / "results"), records(run / "results")
    assert [want[s]["loss"] for s in range(1, 5)] == [got[s]["loss"] for s in range(1, 5)]
    assert len({want[s]["loss"] for s in range(1, 5)}) == 4
    assert "at step 2 (exact: same world size)" in (run / "results" / "log.txt").read_text()
    for weights in ("model", "ema"):  # the final adapters and their EMA, bit for bit
        a, b = (
            load_file(str(export_checkpoint(step_dir(r / "ckpt", 4), r / weights, weights, torch.float32,
                                            adapter_only=True) / ADAPTER_WEIGHTS))
            for r in (tmp_path / "straight", run)
        )  # fmt: skip
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    wa = load_file(str(tmp_path / "straight" / "ckpt" / "step_final" / "ema.safetensors"))
    wb = load_file(str(run / "ckpt" / "step_final" / "ema.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_adapter_parameters_names_strip_the_checkpoint_wrapper():
    from bagel_core.model.parallelize import apply_activation_checkpointing

    cfg = preset("tiny")
    model = build_model(cfg, "meta")
    apply_lora(model, LoRA(2), cfg.llm)
    apply_activation_checkpointing(model, preserve_rng_state=True)
    names = list(adapter_parameters(model))
    assert names and not any("_checkpoint_wrapped_module" in n for n in names)
