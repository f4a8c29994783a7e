"""The import rules of ``bagel_core/__init__.py`` hold, and the checker really catches a violation."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH puts the tree's packages ahead of the editable install, so grimp reads that copy
    env = dict(os.environ, PYTHONPATH=str(tree))
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo"],
        check=False,
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _copy_tree(dst: Path) -> Path:
    for name in ("bagel_core", "assets", "pipelines"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst


def test_contracts_hold_for_the_repository() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "reported"),
    [
        # a lower layer reaching up: the config layer importing the loader
        (
            "bagel_core/config/upward.py",
            "from bagel_core.loader import packed_dataset",
            "bagel_core.config is not allowed to import bagel_core.loader",
        ),
        # packages on one line stay independent: data may not import model
        (
            "bagel_core/data/sideways.py",
            "import bagel_core.model.config",
            "bagel_core.data is not allowed to import bagel_core.model",
        ),
        # the library never imports the orchestration side
        ("bagel_core/plan/orchestrated.py", "import dagster", "bagel_core.plan.orchestrated -> dagster"),
        # a cycle inside a package: the indexer imports schema; schema importing the indexer closes it
        (
            "bagel_core/index/schema.py",
            "from bagel_core.index import indexer",
            "No cycles are allowed in bagel_core.index",
        ),
    ],
)
def test_an_added_violation_fails_the_check(tmp_path: Path, module: str, line: str, reported: str) -> None:
    tree = _copy_tree(tmp_path)
    path = tree / module
    path.write_text((path.read_text() if path.exists() else "") + f"\n{line}  # noqa\n")
    result = _lint(tree)
    assert result.returncode != 0, result.stdout
    assert reported in result.stdout, result.stdout


def test_cli_parser_loads_no_heavy_library() -> None:
    """``bagel --help`` builds every subcommand's parser without torch, DuckDB, Arrow or polars."""
    code = (
        "import sys; from bagel_core.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'duckdb', 'pyarrow', 'polars', 'dagster') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_cli_registers_every_subcommand() -> None:
    from bagel_core.cli import build_parser

    parser = build_parser()
    top = next(a for a in parser._actions if a.dest == "command")
    data = next(a for a in top.choices["data"]._actions if a.dest == "data_command")
    assert {"example", "data", "infer", "export"} <= set(top.choices)
    assert set(data.choices) == {"download", "registry", "check", "index", "stats", "plan", "latents"}
