"""Hostile or absurd configuration: every case ends in exit 2 with an ``error:`` line naming the argument or key and
what to do, before any weight is built (``--dry_run True`` runs every start-up check and nothing else)."""

from __future__ import annotations

import pytest
import yaml
from packed_fixtures import small_fixture
from train_fixtures import train_args

from bagel_core.train.__main__ import cli

CASES = {
    "absurd max_num_tokens (10**12)": (["--max_num_tokens", str(10**12)], "--max_num_tokens"),
    "negative DataLoader workers": (["--num_workers", "-1"], "--num_workers -1 must be >= 0"),
    "a number that is not a number": (["--lr", "fast"], "invalid float value: 'fast'"),
    "an unknown argument (typo)": (["--learning_rate", "1e-4"], "--lr"),
    "negative learning rate": (["--lr", "-1"], "--lr"),
    "zero steps": (["--total_steps", "0"], "--total_steps"),
    "an unknown packing mode": (["--packing", "greedy"], "--packing"),
    "an unknown non-finite policy": (["--nonfinite_loss", "ignore"], "--nonfinite_loss"),
    "checkpoint_dir under a file": (["--checkpoint_dir", "/dev/null/ckpt"], "is a file, not a folder"),
}


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return small_fixture(tmp_path_factory.mktemp("hostile") / "data")


def _exit_status(argv: list[str]) -> int:
    """The CLI's exit status, whether it returns it or argparse exits."""
    try:
        return cli(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_absurd_or_wrong_arguments_are_refused_before_anything_is_built(fx, tmp_path, capsys, case, fault):
    extra, expected = CASES[case]
    assert _exit_status([*train_args(fx, tmp_path), "--dry_run", "True", *extra]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and expected in err, err
    assert not (tmp_path / "ckpt").exists()
    fault(
        f"training argument: {case} (`{' '.join(extra)}`)",
        f"exit 2 before any weight is built; the message names `{expected}`",
    )


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda g: g["t2i_pretrain"].update(weigth=1.0), "weigth"),
        (lambda g: g["t2i_pretrain"].update(weight="heavy"), "weight"),
        (lambda g: g["t2i_pretrain"].update(num_used_data=[-5]), "num_used_data"),
        (lambda g: g["t2i_pretrain"]["image_transform_args"].update(max_image_size=10**9), "max_image_size"),
    ],
    ids=["unknown key", "wrong type", "negative count", "absurd image size"],
)
def test_hostile_dataset_yaml_is_refused_naming_the_key(fx, tmp_path, capsys, edit, expected, fault, request):
    groups = yaml.safe_load(fx.groups.read_text())
    edit(groups)
    bad = tmp_path / "groups.yaml"
    bad.write_text(yaml.safe_dump(groups))
    argv = train_args(fx, tmp_path, dataset_config_file=bad)
    assert cli([*argv, "--dry_run", "True"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and expected in err and str(bad) in err, err
    fault(f"dataset YAML: {request.node.callspec.id}", f"exit 2; the message names the file and `{expected}`")


def test_a_placeholder_left_in_the_registry_is_refused(fx, tmp_path, capsys, fault):
    registry = yaml.safe_load(fx.registry.read_text())
    group = next(iter(registry))
    name = next(iter(registry[group]))
    registry[group][name]["data_dir"] = "your_data_path/bagel_example/t2i"
    bad = tmp_path / "registry.yaml"
    bad.write_text(yaml.safe_dump(registry))
    assert cli([*train_args(fx, tmp_path, dataset_info=bad), "--dry_run", "True"]) == 2
    err = capsys.readouterr().err
    assert "your_data_path" in err and "placeholder" in err and "data_dir" in err, err
    fault("registry: `your_data_path` placeholder left in a path", "exit 2; names the dataset, the key and the fix")
