"""``--packing carry|upstream`` on the trainer: parsed and checked, recorded in the manifest the trainer
plans, and a ``--manifest`` simulated with the other mode is a warning (the assignment is the same)."""

from __future__ import annotations

import logging

import pytest
from packed_fixtures import make_manifest, small_fixture
from train_fixtures import train_args

from bagel_core.config.errors import ConfigError
from bagel_core.train.args import OURS, parse_args
from bagel_core.train.preflight import check_packing, preflight


def test_packing_is_ours_defaults_to_carry_and_is_checked():
    assert "packing" in OURS
    assert parse_args([], world_size=1).data.packing == "carry"
    assert parse_args(["--packing", "upstream"], world_size=1).data.packing == "upstream"
    assert parse_args(["--pack=upstream"], world_size=1).data.packing == "upstream"  # unambiguous prefix
    with pytest.raises(ConfigError, match="--packing 'Upstream' is not supported: use --packing upstream"):
        parse_args(["--packing", "Upstream"], world_size=1)


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return small_fixture(tmp_path_factory.mktemp("args") / "data")


def test_the_manifest_the_trainer_plans_records_its_packing_mode(fx, tmp_path):
    cfg = parse_args(train_args(fx, tmp_path, packing="upstream"), world_size=1)
    launch = preflight(cfg, 1)
    assert launch.manifest is not None and launch.manifest.packing == "upstream"
    assert launch.describe(cfg)["packing"] == "upstream"


def test_a_manifest_simulated_with_another_mode_is_a_warning_not_an_error(fx, tmp_path, caplog):
    manifest = make_manifest(fx, tmp_path / "manifest")  # planned (and recorded) with the default, carry
    cfg = parse_args(train_args(fx, tmp_path, manifest=manifest, packing="upstream"), world_size=1)
    with caplog.at_level(logging.WARNING, logger="bagel_core.train.preflight"):
        assert preflight(cfg, 1).manifest is None
    assert "was simulated with --packing carry, this launch packs with --packing upstream" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bagel_core.train.preflight"):
        check_packing(parse_args([], world_size=1), {"packing": "carry"})
        check_packing(parse_args(["--packing", "upstream"], world_size=1), {})  # planned before modes existed
    assert not caplog.text
