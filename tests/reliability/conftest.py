"""The reliability suite (``-m reliability``): each test injects one fault and records the observed outcome with the
``fault`` fixture; at the end of the session the table is written to ``test-artifacts/reliability.md`` (or
``$BAGEL_TEST_ARTIFACTS``), which is what the README's "Reliability" section shows."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROWS: list[tuple[str, str, str]] = []
ROOT = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.reliability)


@pytest.fixture
def fault(request):
    """``fault(what, outcome)``: one row of the table, recorded when the test passes (a failing test records
    nothing, so the table only ever claims outcomes that were asserted)."""
    recorded: list[tuple[str, str]] = []
    yield lambda what, outcome: recorded.append((what, outcome))
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.passed:
        ROWS.extend((request.node.name, what, outcome) for what, outcome in recorded)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.rep_call = report


def pytest_sessionfinish(session):
    if not ROWS:
        return
    out = Path(os.environ.get("BAGEL_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "reliability.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = ["| fault injected | observed outcome (asserted) | test |", "|---|---|---|"]
    lines += [f"| {what} | {outcome} | `{test}` |" for test, what, outcome in sorted(ROWS, key=lambda r: r[1])]
    out.write_text("\n".join(lines) + "\n")
