"""Test environment: offline, deterministic, isolated Dagster/W&B/torch state under a tmp dir."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_TMP_ROOT = Path(tempfile.mkdtemp(prefix="bagel-tests-"))

# Set before any test module imports transformers / dagster / wandb.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_DIR", str(_TMP_ROOT / "wandb"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYTHONHASHSEED", "0")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_TMP_ROOT / "inductor"))
os.environ["DAGSTER_HOME"] = str(_TMP_ROOT / "dagster_home")
Path(os.environ["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
(Path(os.environ["DAGSTER_HOME"]) / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "services: needs PostgreSQL and Chromium (.ci/services installs them); skipped without them unless "
        "BAGEL_REQUIRE_SERVICES=1, which makes a missing service a failure",
    )
