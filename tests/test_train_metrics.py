"""Training metrics (training.md 8, 10): peak table, FLOPs/MFU and the worked example, the window, upstream's log
line, MetricsLogger files and console, W&B mode/config hygiene and an offline run that never leaks the API key."""

from __future__ import annotations

import io
import json
import re
import secrets
import sys
from pathlib import Path

import pytest
import torch

from bagel_core.model.config import LLMConfig, preset
from bagel_core.train.metrics import (
    RECORD_KEYS,
    MetricsLogger,
    MetricsWindow,
    PeakMemory,
    WandbSettings,
    attention_flops_coefficient,
    compute_mfu,
    dense_params,
    detect_peak_tflops,
    format_log_line,
    llm_flops,
    peak_device_tflops,
    peak_memory_mib,
    redact_secrets,
    resolve_peak_tflops,
    resolve_wandb_mode,
    wandb_api_key_available,
)

UPSTREAM_LINE = (
    "(step=0000100) Train Loss mse: 0.3825, Train Loss ce: 0.7360, Train Steps/Sec: 0.44, Tokens/Sec: 43.69k, "
    "MFU: 28.3%, "
)
STAMP = r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] "
CPU = torch.device("cpu")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def _logger(tmp_path: Path, rank: int = 0, **kw) -> MetricsLogger:
    args = {
        "llm_cfg": preset("7b-mot").llm,
        "world_size": 8,
        "peak_tflops": 989.0,
        "wandb": None,
        "config": {},
        "out": io.StringIO(),
    }
    args.update(kw)
    return MetricsLogger(rank, tmp_path / "results", **args)


def _records(results: Path) -> list[dict]:
    return [json.loads(line) for line in (results / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------- peak table


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H800", 989.0),
        ("NVIDIA H200", 989.0),  # H200 is matched before H20
        ("NVIDIA H20", 148.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A800 80GB PCIe", 312.0),
        ("NVIDIA L40S", 181.05),
        ("NVIDIA L20", 119.5),
        ("AMD Instinct MI300X", 1336.0),
        ("Ascend910B3", 354.0),
        ("NVIDIA GeForce RTX 3070 Ti", 21.75),
        ("Tesla V100-SXM2-32GB", 0.0),
        ("", 0.0),
    ],
)
def test_peak_table_first_match_on_upper_cased_name(name, tflops):
    assert peak_device_tflops(name) == tflops
    assert peak_device_tflops(name.lower()) == tflops


def test_peak_detection_on_cpu_and_configured_override():
    assert detect_peak_tflops(CPU) == 0.0
    assert resolve_peak_tflops(0.0, CPU) == 0.0
    assert resolve_peak_tflops(-1.0, CPU) == 0.0
    assert resolve_peak_tflops(500.0, CPU) == 500.0


# ------------------------------------------------------------------------------------------- FLOPs, MFU


def test_7b_mot_flop_coefficients():
    cfg = preset("7b-mot").llm
    assert dense_params(cfg) == 7_615_283_200
    assert 6 * dense_params(cfg) == 45_691_699_200
    assert attention_flops_coefficient(cfg) == 1_204_224
    assert llm_flops(cfg, 1, 0) == 45_691_699_200
    assert llm_flops(cfg, 0, 1) == 1_204_224


def test_flops_by_hand_for_a_tiny_config():
    cfg = LLMConfig(
        vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    hd, q, kv = 2, 8, 4
    dense = 2 * (3 * 8 * 16 + 8 * (q + kv + kv + q)) + 2 * 10 * 8
    assert dense_params(cfg) == dense
    assert llm_flops(cfg, 7, 25) == 6 * dense * 7 + 12 * hd * 4 * 2 * 25


def test_mfu_zero_when_peak_unknown():
    assert compute_mfu(2e15, 1.0, 0.0, 8) == (2000.0, 0.0)
    assert compute_mfu(2e15, 1.0, 1000.0, 2) == (2000.0, 1.0)


def _worked_example_window() -> MetricsWindow:
    """8 ranks x 10 steps, each pack 32,768 real tokens = 8 samples of 4096 plus a 4096-token flex pad."""
    ranks = [MetricsWindow() for _ in range(8)]
    for window in ranks:
        for _ in range(10):
            window.add(32_768, [4096] * 8 + [4096], capacity_tokens=36_864, loader_wait_s=0.5)
    reduced = [sum(column) for column in zip(*(w.counts() for w in ranks), strict=True)]  # what all_reduce does
    total = MetricsWindow()
    total.set_counts(reduced)
    return total


def test_worked_example_28_3_percent_mfu():
    window = _worked_example_window()
    assert window.tokens == 2_621_440
    assert window.sum_sq_sample_lens == 10 * 8 * 9 * 4096**2 == 12_079_595_520
    flops = llm_flops(preset("7b-mot").llm, window.tokens, window.sum_sq_sample_lens)
    assert flops == pytest.approx(1.343e17, rel=1e-3)
    actual, mfu = compute_mfu(flops, 60.0, 989.0, 8)
    assert round(actual) == 2239
    assert f"{mfu * 100:.1f}%" == "28.3%"
    assert format_log_line(100, 0.3825, 0.7360, 0.44, window.tokens / 60.0, mfu) == UPSTREAM_LINE


def test_worked_example_through_the_logger(tmp_path):
    clock = FakeClock()
    logger = _logger(tmp_path, clock=clock, start_step=90)
    clock.now += 60.0
    window = _worked_example_window()
    values = {"mse": 0.3825, "ce": 0.7360, "loss": 1.1185, "lr": 1e-4, "grad_norm": 0.5, "peak_mem_mib": 61234.4}
    record = logger.log(100, values, window)
    logger.close()
    line = logger.out.getvalue().splitlines()[-1]
    assert re.fullmatch(
        STAMP + re.escape(
            "(step=0000100) Train Loss mse: 0.3825, Train Loss ce: 0.7360, Train Steps/Sec: 0.17, "
            "Tokens/Sec: 43.69k, MFU: 28.3%, lr: 1.000e-04, grad_norm: 0.5000, peak_mem: 61234 MiB, "
            "pad: 11.1%, loader_wait: 5.00s"
        ),
        line,
    )  # fmt: skip
    assert record["tokens_per_sec"] == pytest.approx(43_690.67, abs=0.01)
    assert record["tokens_per_sec_per_gpu"] == pytest.approx(5461.33, abs=0.01)
    assert record["tokens_per_step"] == 262_144
    assert record["mfu"] == pytest.approx(0.28296, abs=1e-5)
    assert record["loader_wait_s"] == 5.0  # mean over ranks of the summed waits
    assert window.tokens == 0  # log() resets the window


# ------------------------------------------------------------------------------------------- window


def test_window_accumulates_resets_and_round_trips_counts():
    window = MetricsWindow()
    window.add(10, [3, 7], capacity_tokens=16, loader_wait_s=0.25)
    window.add(5, [5])
    assert (window.tokens, window.sum_sq_sample_lens, window.capacity_tokens) == (15, 9 + 49 + 25, 16)
    other = MetricsWindow()
    other.set_counts(window.counts())
    assert other == window
    window.reset()
    assert window == MetricsWindow()


def test_window_all_reduce(tmp_path):
    window = MetricsWindow(tokens=3, sum_sq_sample_lens=9)
    window.all_reduce()  # no process group: nothing to do
    assert window.tokens == 3
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        window.all_reduce(CPU)
    finally:
        torch.distributed.destroy_process_group()
    assert (window.tokens, window.sum_sq_sample_lens) == (3, 9)


# ------------------------------------------------------------------------------------------- log line


def test_log_line_is_upstreams_byte_for_byte():
    assert format_log_line(100, 0.3825, 0.7360, 0.44, 43_690.0, 0.283) == UPSTREAM_LINE
    assert format_log_line(7, 0.0, 1.23456, 0.01, 999.0, 0.0).startswith("(step=0000007) Train Loss mse: 0.0000, ")


def test_log_line_extras_follow_the_upstream_prefix():
    line = format_log_line(
        100, 0.3825, 0.7360, 0.44, 43_690.0, 0.283, lr=2e-5, grad_norm=0.5, peak_mem_mib=1234.4,
        pad_fraction=0.125, loader_wait_s=0.25,
    )  # fmt: skip
    assert (
        line == UPSTREAM_LINE + "lr: 2.000e-05, grad_norm: 0.5000, peak_mem: 1234 MiB, pad: 12.5%, loader_wait: 0.25s"
    )


# ------------------------------------------------------------------------------------------- memory


def test_peak_memory_on_cpu_is_max_rss():
    peak = peak_memory_mib(CPU)
    assert isinstance(peak, PeakMemory)
    assert peak.allocated_mib == peak.reserved_mib > 10  # an interpreter with torch holds well over 10 MiB
    assert peak_memory_mib(torch.device("meta")) == (0.0, 0.0)


# ------------------------------------------------------------------------------------------- logger


def test_logger_writes_console_log_txt_and_jsonl(tmp_path):
    clock = FakeClock()
    logger = _logger(tmp_path, clock=clock, world_size=1, peak_tflops=0.0)
    results = tmp_path / "results"
    logger.info("Training for 20 steps, starting at 0...")
    for step in (10, 20):
        window = MetricsWindow()
        window.add(1000, [600, 400])
        clock.now += 2.0
        logger.log(step, {"mse": 0.5, "ce": 1.5, "loss": 2.0, "lr": 1e-4, "grad_norm": 0.3, "my_extra": 7}, window)
        # flushed per line: another process can tail the file while the logger is open
        assert len(_records(results)) == step // 10
    logger.info(f"Saving checkpoint to {tmp_path / 'ckpt'}.")
    logger.close()

    records = _records(results)
    assert list(records[0])[: len(RECORD_KEYS)] == list(RECORD_KEYS)
    assert records[0]["my_extra"] == 7
    assert [r["step"] for r in records] == [10, 20]
    assert records[1]["steps_per_sec"] == 5.0  # 10 steps in 2 s
    assert records[1]["tokens_per_sec"] == 500.0
    assert records[1]["mfu"] == 0.0  # unknown peak
    assert records[1]["total_samples"] is None  # not passed: null
    console = logger.out.getvalue().splitlines()
    assert len(console) == 4
    assert all(re.match(STAMP, line) for line in console)
    assert "\033[" not in logger.out.getvalue()  # not a TTY: no colour, no progress bar
    assert console[0].endswith("] Training for 20 steps, starting at 0...")
    assert "(step=0000020) Train Loss mse: 0.5000, Train Loss ce: 1.5000, Train Steps/Sec: 5.00" in console[2]
    assert (results / "log.txt").read_text().splitlines() == console


def test_resumed_run_appends(tmp_path):
    for start, step in ((0, 10), (10, 20)):
        logger = _logger(tmp_path, start_step=start)
        logger.log(step, {"mse": 0.1, "ce": 0.2}, MetricsWindow())
        logger.close()
    assert [r["step"] for r in _records(tmp_path / "results")] == [10, 20]
    assert len((tmp_path / "results" / "log.txt").read_text().splitlines()) == 2


def test_start_resets_the_window_baseline_after_a_resume(tmp_path):
    clock = FakeClock()
    logger = _logger(tmp_path, clock=clock)  # built at step 0, before the checkpoint is loaded
    clock.now += 100.0  # loading the checkpoint
    logger.start(40)
    clock.now += 5.0
    window = MetricsWindow()
    window.add(1000, [1000])
    record = logger.log(50, {"mse": 0.1, "ce": 0.2}, window)
    logger.close()
    assert record["steps_per_sec"] == 2.0  # 10 steps in 5 s, not 50 in 105
    assert record["tokens_per_step"] == 100.0


def test_values_override_computed_rates_without_a_window(tmp_path):
    logger = _logger(tmp_path)
    record = logger.log(5, {"mse": 0.1, "ce": 0.2, "tokens_per_sec": 2500.0, "mfu": 0.5, "loss": float("nan")})
    logger.close()
    assert "Tokens/Sec: 2.50k, MFU: 50.0%, " in logger.out.getvalue()
    assert record["loss"] is None  # NaN is not JSON
    assert _records(tmp_path / "results") == [record]


def test_other_ranks_do_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # importing wandb would now fail
    logger = _logger(tmp_path, rank=1, wandb=WandbSettings(offline=True))
    window = MetricsWindow(tokens=5)
    logger.info("hello")
    assert logger.log(10, {"mse": 1.0}, window) == {}
    logger.close()
    assert window.tokens == 0  # still reset, like on rank 0
    assert logger.out.getvalue() == ""
    assert not (tmp_path / "results").exists()


def test_tty_gets_colour_and_a_progress_bar(tmp_path):
    out = FakeTTY()
    logger = _logger(tmp_path, out=out, progress_total=100)
    logger.start(5)
    assert "5/100" in out.getvalue()
    logger.log(10, {"mse": 0.1, "ce": 0.2}, MetricsWindow())
    logger.close()
    text = out.getvalue()
    assert "\033[34m" in text and "\033[0m] (step=0000010)" in text
    assert "10/100" in text  # tqdm's counter
    assert "\033[" not in (tmp_path / "results" / "log.txt").read_text()


# ------------------------------------------------------------------------------------------- W&B settings


def test_wandb_settings_from_upstream_args():
    from bagel_core.train.args import TrainingArguments

    assert WandbSettings.from_args(TrainingArguments()) == WandbSettings()
    assert WandbSettings().run_id == "run-run0"
    args = TrainingArguments(wandb_name="sft", wandb_runid="3", wandb_resume="must", wandb_offline=True)
    settings = WandbSettings.from_args(args)
    assert (settings.run_id, settings.resume, settings.offline) == ("sft-run3", "must", True)


@pytest.mark.parametrize(
    ("offline", "env", "has_key", "mode"),
    [
        (False, {}, True, "online"),
        (False, {}, False, "offline"),  # no key: never prompt, log locally
        (True, {}, True, "offline"),
        (False, {"WANDB_MODE": "offline"}, True, "offline"),
        (False, {"WANDB_MODE": "disabled"}, True, "disabled"),
        (True, {"WANDB_MODE": "disabled"}, False, "disabled"),
    ],
)
def test_wandb_mode(offline, env, has_key, mode):
    assert resolve_wandb_mode(offline, env, lambda: has_key) == mode


def test_api_key_lookup_is_local(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_api_key_available()
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("NETRC", str(tmp_path / "absent"))
    assert not wandb_api_key_available()
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {'y' * 40}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_api_key_available()


def test_redact_secrets_drops_key_like_fields_and_values(monkeypatch):
    key = "local-" + secrets.token_hex(20)
    monkeypatch.setenv("WANDB_API_KEY", key)
    config = {
        "training": {"lr": 1e-4, "wandb_api_key": key, "expected_num_tokens": 5, "hf_token": "t", "note": f"k={key}"},
        "data": {"max_num_tokens": 9},
        "model": {"tie_word_embeddings": False},
        "SECRET": 1,
    }
    assert redact_secrets(config) == {
        "training": {"lr": 1e-4, "expected_num_tokens": 5},
        "data": {"max_num_tokens": 9},
        "model": {"tie_word_embeddings": False},
    }


def test_wandb_disabled_by_env_never_imports_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setitem(sys.modules, "wandb", None)
    logger = _logger(tmp_path, wandb=WandbSettings())
    logger.log(1, {"mse": 0.1, "ce": 0.2}, MetricsWindow())
    logger.close()
    assert not (tmp_path / "results" / "wandb").exists()


def test_offline_wandb_run_logs_metrics_and_never_leaks_the_api_key(tmp_path, monkeypatch, capfd):
    key = "local-" + secrets.token_hex(20)
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    config = {"training": {"global_seed": 4396, "wandb_api_key": key}, "note": f"launched with {key}"}
    clock = FakeClock()
    logger = _logger(tmp_path, wandb=WandbSettings(name="leak", runid="7", offline=True), config=config, clock=clock)
    for step in (1, 2, 3):
        window = MetricsWindow()
        window.add(4096, [4096])
        clock.now += 1.0
        values = {"mse": 0.4, "ce": 0.7, "lr": 1e-4, "grad_norm": 0.5, "peak_mem_mib": 100.0, "pad_sentinel": 1.0}
        logger.log(step, values, window)
    logger.close()

    captured = capfd.readouterr()
    assert key not in captured.out + captured.err + logger.out.getvalue()
    files = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()]
    assert files
    leaks = [str(p) for p in files if key.encode() in p.read_bytes()]
    assert leaks == []

    runs = list((tmp_path / "results" / "wandb").glob("offline-run-*-leak-run7"))
    assert len(runs) == 1
    (store,) = runs[0].glob("*.wandb")  # the run's record log: protobufs with the metric and config names
    data = store.read_bytes()
    for name in (b"tokens_per_sec", b"mfu", b"pad_sentinel", b"total_norm", b"mem_allocated", b"global_seed"):
        assert name in data, name
    assert b"wandb_api_key" not in data


def test_online_start_failure_falls_back_to_offline(tmp_path, monkeypatch):
    from bagel_core.train import metrics

    key = "local-" + secrets.token_hex(20)
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    modes = []

    class FakeRun:
        def log(self, payload, step):
            modes.append(("log", step, payload["ce"]))

        def finish(self):
            modes.append("finish")

    def fake_init(settings, mode, results_dir, config):
        modes.append(mode)
        if mode == "online":
            raise TimeoutError(f"could not reach the server with key {key}")
        return FakeRun()

    monkeypatch.setattr(metrics, "init_wandb", fake_init)
    monkeypatch.setattr(metrics, "_teardown_wandb", lambda: modes.append("teardown"))
    logger = _logger(tmp_path, wandb=WandbSettings())
    logger.log(1, {"mse": 0.1, "ce": 0.2}, MetricsWindow())
    logger.close()
    assert modes == ["online", "offline", ("log", 1, 0.2), "finish", "teardown"]
    assert "online start failed (TimeoutError)" in logger.out.getvalue()
    assert key not in logger.out.getvalue()
