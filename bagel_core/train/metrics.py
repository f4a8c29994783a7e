"""Training metrics: upstream's log line, MFU, ``metrics.jsonl`` and W&B, written by rank 0 only (training.md 8, 10).

Pieces, each with one job:

* ``peak_device_tflops`` / ``detect_peak_tflops`` / ``resolve_peak_tflops``: upstream's per-GPU bf16 peak table;
* ``dense_params`` / ``attention_flops_coefficient`` / ``llm_flops`` / ``compute_mfu``: upstream's FLOP count
  (only the LLM counts: 6 * dense_N * T + 12 * hd * nh * L * S);
* ``MetricsWindow``: what one rank saw since the last log (T, S, pack capacity, loader wait), SUM-reducible;
* ``format_log_line``: upstream's line, byte for byte, followed by our extras;
* ``peak_memory_mib``: peak device memory (CUDA) or the process's peak RSS (CPU);
* ``WandbSettings`` / ``resolve_wandb_mode`` / ``redact_secrets``: W&B run identity, mode and config hygiene;
* ``MetricsLogger``: built on every rank, writes only on rank 0: console (+ tqdm bar on a TTY), ``log.txt``,
  ``metrics.jsonl`` (append, flushed per line, no history kept in memory) and W&B.

Trainer protocol (every rank, per micro-step and per log)::

    window.add(real_tokens, sample_lens, capacity_tokens=max_num_tokens, loader_wait_s=wait)
    ...
    window.all_reduce(device)               # collective: every rank, before log()
    values = {"mse": ..., "ce": ..., "loss": ..., "lr": ..., "grad_norm": ...,   # already global
              "peak_mem_mib": ..., "total_ce_tokens": ..., "total_mse_tokens": ..., "total_samples": ...}
    logger.log(step, values, window)        # rank 0 writes; every rank resets the window
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import torch

from bagel_core.model.config import LLMConfig

METRICS_FILE = "metrics.jsonl"


def read_metrics(results_dir: str | Path) -> dict[int, dict[str, Any]]:
    """``metrics.jsonl`` by step (empty when absent); a step logged twice (a run killed after logging it and
    resumed from an earlier checkpoint) keeps its last record."""
    path = Path(results_dir) / METRICS_FILE
    if not path.is_file():
        return {}
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {int(rec["step"]): rec for rec in records}


def vae_sources_line(cached: int, live: int) -> str:
    """The trainer's closing line on where its VAE latents came from (all ranks); :func:`vae_image_sources` reads it."""
    return f"all ranks: {cached} VAE image(s) from the latent cache, {live} encoded live"


_VAE_SOURCES = re.compile(r"all ranks: (\d+) VAE image\(s\) from the latent cache, (\d+) encoded live")


def vae_image_sources(log_text: str) -> dict[str, int] | None:
    """``{"cached", "live"}`` from a training log (its last session's line), or None when it has none."""
    found = _VAE_SOURCES.findall(log_text)
    return {"cached": int(found[-1][0]), "live": int(found[-1][1])} if found else None


def steps_seconds(records: Sequence[Mapping[str, Any]]) -> float:
    """Seconds the logged steps took, from each record's ``steps_per_sec`` over the steps since the one before."""
    total, previous = 0.0, 0
    for rec in records:
        if rec.get("steps_per_sec"):
            total += (rec["step"] - previous) / rec["steps_per_sec"]
        previous = rec["step"]
    return total


# ------------------------------------------------------------------------------------------- peak TFLOPs

# Upstream's ``detect_peak_tflops`` table, in its order: the first tag found in the upper-cased device name wins
# (so "H200" is matched before "H20", and "L40S" counts as "L40"). Per-GPU dense bf16 TFLOP/s.
PEAK_TFLOPS_TABLE: tuple[tuple[tuple[str, ...], float], ...] = (
    (("MI300X",), 1336.0),
    (("H100", "H800", "H200"), 989.0),
    (("A100", "A800"), 312.0),
    (("L40",), 181.05),
    (("L20",), 119.5),
    (("H20",), 148.0),
    (("910B",), 354.0),
    (("RTX 3070 TI",), 21.75),
)


def peak_device_tflops(device_name: str) -> float:
    """Per-GPU bf16 peak for a device name from upstream's table; 0.0 when the name is unknown."""
    name = device_name.upper()
    for tags, tflops in PEAK_TFLOPS_TABLE:
        if any(tag in name for tag in tags):
            return tflops
    return 0.0


def detect_peak_tflops(device: torch.device) -> float:
    """Peak of the accelerator behind ``device``: CUDA looks its name up in the table; CPU and others give 0.0."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return 0.0
    return peak_device_tflops(torch.cuda.get_device_name(device))


def resolve_peak_tflops(configured: float, device: torch.device) -> float:
    """Upstream's ``--peak_device_tflops`` rule: a positive value is used as given, otherwise detect it."""
    return configured if configured > 0 else detect_peak_tflops(device)


# ------------------------------------------------------------------------------------------- FLOPs and MFU


def dense_params(cfg: LLMConfig) -> int:
    """dense_N of training.md 10: L * (mlp_N + attn_linear_N) + emb_N (embedding and LM head both count)."""
    hd, nh, nkv, hidden = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
    mlp = 3 * hidden * cfg.intermediate_size
    attn_linear = hidden * (nh * hd + 2 * nkv * hd + nh * hd)  # q, k, v, o projections
    embeddings = 2 * cfg.vocab_size * hidden
    return cfg.num_hidden_layers * (mlp + attn_linear) + embeddings


def attention_flops_coefficient(cfg: LLMConfig) -> int:
    """12 * hd * nh * L: training FLOPs of the attention scores per squared sample length (masking ignored)."""
    return 12 * cfg.head_dim * cfg.num_attention_heads * cfg.num_hidden_layers


def llm_flops(llm_cfg: LLMConfig, tokens: int, sum_sq_sample_lens: int) -> float:
    """Training FLOPs of the LLM for T real tokens and S = sum of squared sample lengths (training.md 10).

    ViT, VAE, connector and activation recomputation are not counted, so this gives MFU, not HFU."""
    dense = 6 * dense_params(llm_cfg) * int(tokens)
    return float(dense + attention_flops_coefficient(llm_cfg) * int(sum_sq_sample_lens))


def compute_mfu(flops: float, elapsed_s: float, peak_tflops: float, world_size: int) -> tuple[float, float]:
    """(actual TFLOP/s, MFU as a fraction) = flops / elapsed / 1e12 and that over peak * world_size (0 if unknown)."""
    actual_tflops = flops / max(elapsed_s, 1e-6) / 1e12
    peak_total = peak_tflops * world_size
    return actual_tflops, (actual_tflops / peak_total if peak_total > 0 else 0.0)


# ------------------------------------------------------------------------------------------- window


@dataclass
class MetricsWindow:
    """What was trained since the last log line.

    Counts are per rank while ``add`` accumulates them; ``all_reduce`` (or ``counts`` -> SUM over ranks ->
    ``set_counts``) turns them into global sums, which is what ``MetricsLogger.log`` expects. After the reduction
    ``loader_wait_s`` is the sum over ranks; the logger divides it by the world size (mean wait per rank).
    """

    tokens: int = 0  # T: real (unpadded) tokens
    sum_sq_sample_lens: int = 0  # S: sum over packs of sum(sample_len ** 2); the flex pad counts as a sample
    capacity_tokens: int = 0  # sum over packs of max_num_tokens (for the pad fraction); 0 = not tracked
    loader_wait_s: float = 0.0  # seconds spent waiting for the data loader

    def add(
        self, tokens: int, sample_lens: Sequence[int], *, capacity_tokens: int = 0, loader_wait_s: float = 0.0
    ) -> None:
        """Account one micro-step's pack: its real tokens, its ``sample_lens`` and optionally capacity and wait."""
        self.tokens += int(tokens)
        self.sum_sq_sample_lens += sum(int(n) * int(n) for n in sample_lens)
        self.capacity_tokens += int(capacity_tokens)
        self.loader_wait_s += float(loader_wait_s)

    def reset(self) -> None:
        """Start a new window."""
        self.tokens = self.sum_sq_sample_lens = self.capacity_tokens = 0
        self.loader_wait_s = 0.0

    def counts(self) -> list[float]:
        """The numbers to SUM-reduce over ranks, in ``set_counts`` order (exact below 2**53)."""
        return [float(self.tokens), float(self.sum_sq_sample_lens), float(self.capacity_tokens), self.loader_wait_s]

    def set_counts(self, counts: Sequence[float]) -> None:
        """Load reduced numbers produced from ``counts``."""
        tokens, sum_sq, capacity, wait = counts
        self.tokens, self.sum_sq_sample_lens, self.capacity_tokens = round(tokens), round(sum_sq), round(capacity)
        self.loader_wait_s = float(wait)

    def all_reduce(self, device: torch.device | None = None) -> None:
        """SUM the counts over all ranks (a collective: call it on every rank); no-op without a process group."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        buf = torch.tensor(self.counts(), dtype=torch.float64, device=device)
        torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
        self.set_counts(buf.tolist())


def throughput(
    window: MetricsWindow, elapsed_s: float, steps: int, *, llm_cfg: LLMConfig, world_size: int, peak_tflops: float
) -> dict[str, float | None]:
    """Rates of a globally reduced window over ``elapsed_s`` seconds and ``steps`` optimizer steps."""
    elapsed_s = max(elapsed_s, 1e-6)
    actual_tflops, mfu = compute_mfu(
        llm_flops(llm_cfg, window.tokens, window.sum_sq_sample_lens), elapsed_s, peak_tflops, world_size
    )
    tokens_per_sec = window.tokens / elapsed_s
    return {
        "steps_per_sec": steps / elapsed_s,
        "tokens_per_sec": tokens_per_sec,
        "tokens_per_sec_per_gpu": tokens_per_sec / world_size,
        "tokens_per_step": window.tokens / max(steps, 1),
        "actual_tflops": actual_tflops,
        "mfu": mfu,
        "pad_fraction": 1.0 - window.tokens / window.capacity_tokens if window.capacity_tokens > 0 else None,
        "loader_wait_s": window.loader_wait_s / world_size,
    }


# ------------------------------------------------------------------------------------------- log line


def format_log_line(
    step: int,
    mse: float,
    ce: float,
    steps_per_sec: float,
    tokens_per_sec: float,
    mfu: float,
    *,
    lr: float | None = None,
    grad_norm: float | None = None,
    peak_mem_mib: float | None = None,
    pad_fraction: float | None = None,
    loader_wait_s: float | None = None,
) -> str:
    """Upstream's metrics line (``mfu`` is a fraction; note the trailing ", "), then our extras that are given."""
    line = (
        f"(step={step:07d}) Train Loss mse: {mse:.4f}, Train Loss ce: {ce:.4f}, "
        f"Train Steps/Sec: {steps_per_sec:.2f}, Tokens/Sec: {tokens_per_sec / 1000:.2f}k, MFU: {mfu * 100:.1f}%, "
    )
    extras = []
    if lr is not None:
        extras.append(f"lr: {lr:.3e}")
    if grad_norm is not None:
        extras.append(f"grad_norm: {grad_norm:.4f}")
    if peak_mem_mib is not None:
        extras.append(f"peak_mem: {peak_mem_mib:.0f} MiB")
    if pad_fraction is not None:
        extras.append(f"pad: {pad_fraction * 100:.1f}%")
    if loader_wait_s is not None:
        extras.append(f"loader_wait: {loader_wait_s:.2f}s")
    return line + ", ".join(extras)


# ------------------------------------------------------------------------------------------- memory


class PeakMemory(NamedTuple):
    """Peak memory in MiB; a tuple, so ``torch.tensor(list(peak))`` can be MAX-reduced over ranks."""

    allocated_mib: float
    reserved_mib: float


def peak_memory_mib(device: torch.device) -> PeakMemory:
    """Peak memory of this rank.

    CUDA: ``max_memory_allocated`` (live tensors) and ``max_memory_reserved`` (the caching allocator's pool) since
    the start or the last ``torch.cuda.reset_peak_memory_stats`` -- upstream's ``mem_allocated`` / ``mem_cache``.
    CPU: the process's lifetime peak resident set size (``getrusage``) for both: it counts everything the process
    holds (interpreter, libraries, loader buffers), not just tensors, and cannot be reset. Otherwise zeros.
    """
    if device.type == "cuda" and torch.cuda.is_available():
        return PeakMemory(
            torch.cuda.max_memory_allocated(device) / 2**20, torch.cuda.max_memory_reserved(device) / 2**20
        )
    if device.type == "cpu":
        try:
            import resource
        except ImportError:  # Windows
            return PeakMemory(0.0, 0.0)
        max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        mib = max_rss / 2**20 if sys.platform == "darwin" else max_rss / 2**10
        return PeakMemory(mib, mib)
    return PeakMemory(0.0, 0.0)


# ------------------------------------------------------------------------------------------- W&B


@dataclass(frozen=True)
class WandbSettings:
    """Upstream's W&B arguments; the run id is ``<name>-run<runid>`` so a restart with the same ids resumes it."""

    project: str = "bagel"
    name: str = "run"
    runid: str = "0"
    resume: str = "allow"
    offline: bool = False

    @property
    def run_id(self) -> str:
        return f"{self.name}-run{self.runid}"

    @classmethod
    def from_args(cls, args: Any) -> WandbSettings:
        """From an object with upstream's fields (``wandb_project``, ``wandb_name``, ``wandb_runid``, ...)."""
        return cls(
            project=str(args.wandb_project),
            name=str(args.wandb_name),
            runid=str(args.wandb_runid),
            resume=str(args.wandb_resume),
            offline=bool(args.wandb_offline),
        )


def wandb_api_key_available() -> bool:
    """Whether W&B could authenticate without prompting: ``WANDB_API_KEY``, else a netrc entry for its host.

    Reads local files only (no network, no prompt); the key itself is never returned."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth

        return bool(wbauth.read_netrc_auth(host=wandb_setup.singleton().settings.base_url))
    except ImportError:  # older wandb: the (since deprecated) public accessor
        import wandb

        return bool(wandb.api.api_key)
    except Exception:  # noqa: BLE001 - an unreadable or malformed netrc: W&B could not log in either
        return False


def resolve_wandb_mode(
    offline: bool, environ: Mapping[str, str] | None = None, has_api_key: Callable[[], bool] | None = None
) -> str:
    """``disabled`` when WANDB_MODE=disabled; ``offline`` when asked (flag or WANDB_MODE) or when no API key is
    available (so a run never prompts or waits on a login); otherwise ``online``."""
    env = os.environ if environ is None else environ
    mode = env.get("WANDB_MODE", "").lower()
    if mode == "disabled" or env.get("WANDB_DISABLED", "").lower() in ("1", "true"):
        return "disabled"
    if offline or mode in ("offline", "dryrun"):
        return "offline"
    return "online" if (has_api_key or wandb_api_key_available)() else "offline"


_SECRET_WORDS = frozenset({"key", "apikey", "secret", "password", "passwd", "token", "credential", "credentials"})


def _is_secret_name(name: str) -> bool:
    """``wandb_api_key``, ``hf_token``, ``secret`` ... but not ``max_num_tokens`` or ``tie_word_embeddings``."""
    return any(word in _SECRET_WORDS for word in re.split(r"[^a-z0-9]+", name.lower()))


def redact_secrets(config: Mapping[str, Any], secrets: Sequence[str] = ()) -> dict[str, Any]:
    """A copy of ``config`` (nested mappings too) without key-like fields and without string values that contain
    any of ``secrets`` (plus ``WANDB_API_KEY`` when set)."""
    needles = [s for s in (*secrets, os.environ.get("WANDB_API_KEY", "")) if s]
    out: dict[str, Any] = {}
    for name, value in config.items():
        if _is_secret_name(str(name)):
            continue
        if isinstance(value, Mapping):
            value = redact_secrets(value, needles)
        elif isinstance(value, str) and any(s in value for s in needles):
            continue
        out[name] = value
    return out


def init_wandb(settings: WandbSettings, mode: str, results_dir: Path, config: Mapping[str, Any]) -> Any:
    """Start (or resume) the W&B run under ``results_dir/wandb`` and return it; imports wandb only here."""
    import wandb

    return wandb.init(
        project=settings.project,
        name=settings.name,
        id=settings.run_id,
        resume=settings.resume,
        mode=mode,
        dir=str(results_dir),
        config=redact_secrets(config),
        settings=wandb.Settings(init_timeout=120, console="off"),  # "off": never wrap our stdout / stderr
    )


def _teardown_wandb() -> None:
    """Wait until W&B's service has written everything (``finish`` alone may return before an offline run's
    records are on disk; its atexit hook is unreliable under multiprocessing launchers)."""
    import wandb

    wandb.teardown()


# ------------------------------------------------------------------------------------------- logger

# metrics.jsonl keys, in order; values the trainer does not pass are written as null.
RECORD_KEYS = (
    "step",
    "mse",
    "ce",
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_sec",
    "steps_per_sec",
    "mfu",
    "actual_tflops",
    "peak_mem_mib",
    "total_ce_tokens",
    "total_mse_tokens",
    "total_samples",
    "tokens_per_step",
    "tokens_per_sec_per_gpu",
    "pad_fraction",
    "loader_wait_s",
)
# Upstream's W&B names for values we record under another name (kept so old dashboards keep working).
WANDB_ALIASES = {"grad_norm": "total_norm", "peak_mem_mib": "mem_allocated", "peak_mem_reserved_mib": "mem_cache"}

_BLUE, _RESET = "\033[34m", "\033[0m"


def _number(value: Any) -> int | float | None:
    """A JSON-safe number: ints stay ints, tensors and floats become floats, NaN / inf become None."""
    if value is None:
        return None
    if isinstance(value, (bool, int)):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


def _isatty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class MetricsLogger:
    """Rank 0 writes the console, ``log.txt``, ``metrics.jsonl`` and W&B; on other ranks every method is a no-op
    (except that ``log`` still resets the window it is given).

    Throughput is measured between consecutive ``log`` calls. The first window starts when the constructor
    returns (at ``start_step``), or at ``start(step)`` -- call that right before the loop when the logger was
    built before resuming.
    """

    def __init__(
        self,
        rank: int,
        results_dir: str | Path,
        *,
        llm_cfg: LLMConfig,
        world_size: int,
        peak_tflops: float,
        wandb: WandbSettings | None,
        config: Mapping[str, Any],
        out: TextIO = sys.stdout,
        progress_total: int | None = None,
        start_step: int = 0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.enabled = rank == 0
        self.llm_cfg, self.world_size, self.peak_tflops = llm_cfg, world_size, peak_tflops
        self.out, self._clock = out, clock
        self._run: Any = None
        self._bar: Any = None
        if not self.enabled:
            return
        self.results_dir = Path(results_dir)
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self._color = _isatty(out)
        # Kept open (append: a resumed run continues them) until close().
        self._log_txt = open(self.results_dir / "log.txt", "a", encoding="utf-8")  # noqa: SIM115
        self._jsonl = open(self.results_dir / METRICS_FILE, "a", encoding="utf-8")  # noqa: SIM115
        if self._color:
            from tqdm import tqdm

            self._bar = tqdm(total=progress_total, initial=start_step, file=out, unit="step", dynamic_ncols=True)
        if wandb is not None:
            self._start_wandb(wandb, config)
        self._last_step, self._last_time = start_step, clock()

    # ---------------------------------------------------------------- public

    @property
    def wandb_url(self) -> str | None:
        """The W&B run page when logging online, else None (offline runs have no page until synced)."""
        if self._run is None or getattr(self._run, "offline", False):
            return None
        return getattr(self._run, "url", None) or None

    def start(self, step: int) -> None:
        """Measure the next window from now and from optimizer step ``step`` (call right before the loop, after
        a resume): rates then exclude start-up and checkpoint loading."""
        if not self.enabled:
            return
        self._last_step, self._last_time = step, self._clock()
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def info(self, msg: str) -> None:
        """One timestamped line on the console and in ``log.txt`` (rank 0)."""
        if not self.enabled:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        console = f"[{_BLUE}{stamp}{_RESET}] {msg}" if self._color else f"[{stamp}] {msg}"
        if self._bar is not None:
            self._bar.write(console, file=self.out)
        else:
            self.out.write(console + "\n")
            self.out.flush()
        self._log_txt.write(f"[{stamp}] {msg}\n")
        self._log_txt.flush()

    def log(self, step: int, values: Mapping[str, Any], window: MetricsWindow | None = None) -> dict[str, Any]:
        """Log optimizer step ``step``: the line, one ``metrics.jsonl`` record and W&B; returns the record
        (empty on other ranks).

        ``window`` must already be reduced over ranks and is reset here on every rank. ``values`` must already be
        global (mean losses, max memory over ranks ...); they override computed keys of the same name.
        """
        if not self.enabled:
            if window is not None:
                window.reset()
            return {}
        now = self._clock()
        steps = max(step - self._last_step, 1)
        if window is None:  # the caller passes its own rates in ``values``
            rates: dict[str, float | None] = {"steps_per_sec": steps / max(now - self._last_time, 1e-6)}
        else:
            rates = throughput(
                window,
                now - self._last_time,
                steps,
                llm_cfg=self.llm_cfg,
                world_size=self.world_size,
                peak_tflops=self.peak_tflops,
            )
            window.reset()
        record = self._record(step, rates, values)
        self.info(self._line(record))
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._run is not None:
            self._run.log(self._wandb_payload(record), step=step)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
        self._last_step, self._last_time = step, now
        return record

    def close(self) -> None:
        """Close the bar, the files and the W&B run (safe to call twice)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._run is not None:
            self._run.finish()
            self._run = None
            _teardown_wandb()
        self._log_txt.close()
        self._jsonl.close()

    # ---------------------------------------------------------------- helpers

    def _start_wandb(self, settings: WandbSettings, config: Mapping[str, Any]) -> None:
        mode = resolve_wandb_mode(settings.offline)
        if mode == "disabled":
            return
        if mode == "offline" and not settings.offline:
            self.info("W&B: no API key found (WANDB_API_KEY or netrc); logging offline, `wandb sync` it later.")
        try:
            self._run = init_wandb(settings, mode, self.results_dir, config)
        except Exception as exc:  # any failure to reach W&B must not stop training
            if mode != "online":
                raise
            mode = "offline"  # only the type is shown: an error message could quote credentials
            self.info(f"W&B: online start failed ({type(exc).__name__}); logging offline, `wandb sync` it later.")
            self._run = init_wandb(settings, mode, self.results_dir, config)
        self.info(f"W&B run {settings.run_id} ({mode}) in {self.results_dir / 'wandb'}")

    @staticmethod
    def _record(step: int, rates: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
        merged = {**rates, **values}
        record: dict[str, Any] = {"step": int(step)}
        for key in RECORD_KEYS[1:]:
            record[key] = _number(merged.get(key))
        for key, value in values.items():
            if key not in record:
                record[key] = _number(value)
        return record

    @staticmethod
    def _line(record: Mapping[str, Any]) -> str:
        def get(key: str) -> float:
            return record[key] if record[key] is not None else 0.0

        return format_log_line(
            record["step"],
            get("mse"),
            get("ce"),
            get("steps_per_sec"),
            get("tokens_per_sec"),
            get("mfu"),
            lr=record["lr"],
            grad_norm=record["grad_norm"],
            peak_mem_mib=record["peak_mem_mib"],
            pad_fraction=record["pad_fraction"],
            loader_wait_s=record["loader_wait_s"],
        )

    @staticmethod
    def _wandb_payload(record: Mapping[str, Any]) -> dict[str, Any]:
        payload = {k: v for k, v in record.items() if k != "step" and v is not None}
        for ours, upstream in WANDB_ALIASES.items():
            if ours in payload:
                payload[upstream] = payload[ours]
        return payload
