"""Registry and dataset-group YAML: upstream import, discovery of the example, and validation errors."""

import json
import textwrap

import pytest
import yaml

from bagel_core.config.dataset_config import load_dataset_config, parse_dataset_config
from bagel_core.config.discover import default_dataset_config, discover_registry
from bagel_core.config.errors import ConfigError
from bagel_core.config.registry import Registry, import_upstream_dataset_info, parse_upstream_dataset_info
from bagel_core.config.validate import require_valid, validate_registry
from bagel_core.data.example_generator import ExampleConfig, write_example_dataset

# An upstream-style data/dataset_info.py: imports and a registry of classes around a literal.
UPSTREAM_DATASET_INFO = textwrap.dedent("""
    # Copyright (c) 2025 Bytedance Ltd. and/or its affiliates.
    from .interleave_datasets import UnifiedEditIterableDataset
    from .t2i_dataset import T2IIterableDataset
    from .vlm_dataset import SftJSONLIterableDataset


    DATASET_REGISTRY = {
        't2i_pretrain': T2IIterableDataset,
        'vlm_sft': SftJSONLIterableDataset,
        'unified_edit': UnifiedEditIterableDataset,
    }


    DATASET_INFO = {
        't2i_pretrain': {
            't2i': {
                'data_dir': 'your_data_path/bagel_example/t2i', # path of the parquet files
                'num_files': 10, # number of data units to be sharded across all ranks and workers
                'num_total_samples': 1000, # number of total samples in the dataset
            },
        },
        'unified_edit':{
            'seedxedit_multi': {
                'data_dir': 'your_data_path/bagel_example/editing/seedxedit_multi',
                'num_files': 10,
                'num_total_samples': 1000,
                "parquet_info_path": 'your_data_path/bagel_example/editing/parquet_info/seedxedit_multi_nas.json',
            },
        },
        'vlm_sft': {
            'llava_ov': {
                'data_dir': 'your_data_path/bagel_example/vlm/images',
                'jsonl_path': 'your_data_path/bagel_example/vlm/llava_ov_si.jsonl',
                'num_total_samples': 1000
            },
        },
    }
""")

# Upstream data/configs/example.yaml, verbatim in structure and values.
UPSTREAM_EXAMPLE_YAML = textwrap.dedent("""
    t2i_pretrain:
      dataset_names:
      - t2i
      image_transform_args:
        image_stride: 16
        max_image_size: 1024
        min_image_size: 512
      is_mandatory: true
      num_used_data: # The sum should be larger that NUM_GPUS x NUM_WORKERS
      - 10
      weight: 1

    unified_edit:
      dataset_names:
      - seedxedit_multi
      image_transform_args:
        image_stride: 16
        max_image_size: 1024
        min_image_size: 512
      vit_image_transform_args:
        image_stride: 14
        max_image_size: 518
        min_image_size: 224
      is_mandatory: false
      num_used_data:
      - 10
      weight: 1

    vlm_sft:
      dataset_names:
      - llava_ov
      image_transform_args:
        image_stride: 14
        max_image_size: 980
        min_image_size: 378
        max_pixels: 2_007_040
      frame_sampler_args:
        max_num_frames: 12
        min_num_frames: 8
      is_mandatory: true
      shuffle_lines: True
      shuffle_seed: 0
      num_used_data:
      - 1000
      weight: 1
""")

SMALL = ExampleConfig(
    t2i_files=2, t2i_rows_per_file=3, edit_files=2, edit_row_groups_per_file=2, edit_rows_per_row_group=2, vlm_lines=6
)


@pytest.fixture(scope="module")
def example_root(tmp_path_factory):
    return write_example_dataset(tmp_path_factory.mktemp("reg"), SMALL).parent


def test_upstream_dataset_info_imports_without_executing(tmp_path):
    path = tmp_path / "dataset_info.py"
    path.write_text(UPSTREAM_DATASET_INFO)  # its relative imports would fail if it were executed
    registry = import_upstream_dataset_info(path)
    assert [(e.group, e.name) for e in registry.entries] == [
        ("t2i_pretrain", "t2i"),
        ("unified_edit", "seedxedit_multi"),
        ("vlm_sft", "llava_ov"),
    ]
    t2i = registry.get("t2i_pretrain", "t2i")
    assert (t2i.num_files, t2i.num_total_samples, t2i.task) == (10, 1000, "t2i")
    errors = validate_registry(registry)
    # Every path still has the placeholder: one error per entry, naming the key.
    assert [(f.dataset, f.key) for f in errors] == [
        ("t2i_pretrain/t2i", "data_dir"),
        ("unified_edit/seedxedit_multi", "data_dir"),
        ("unified_edit/seedxedit_multi", "parquet_info_path"),
        ("vlm_sft/llava_ov", "data_dir"),
        ("vlm_sft/llava_ov", "jsonl_path"),
    ]
    assert all("your_data_path" in f.message for f in errors)
    with pytest.raises(ConfigError, match=r"t2i_pretrain/t2i\.data_dir: still contains the 'your_data_path'"):
        require_valid(registry)


def test_upstream_dataset_info_with_data_root_points_at_real_data(tmp_path, example_root):
    path = tmp_path / "dataset_info.py"
    path.write_text(UPSTREAM_DATASET_INFO)
    registry = import_upstream_dataset_info(path, data_root=example_root)
    assert registry.get("t2i_pretrain", "t2i").data_dir == example_root / "bagel_example" / "t2i"
    findings = validate_registry(registry)
    # Real folders now; the upstream counts (10 files / 1000 samples) disagree with the small example,
    # and the upstream parquet_info keys still carry the placeholder.
    assert ("t2i_pretrain/t2i", "num_files", "warning") in {(f.dataset, f.key, f.severity) for f in findings}
    info_errors = [f for f in findings if f.key == "parquet_info_path"]
    assert info_errors and "still contain 'your_data_path'" in info_errors[0].message


def test_dataset_info_that_is_not_a_literal_is_refused():
    with pytest.raises(ConfigError, match="must be a plain literal"):
        parse_upstream_dataset_info("ROOT = '/d'\nDATASET_INFO = {'t2i_pretrain': {'t2i': {'data_dir': ROOT}}}\n")
    with pytest.raises(ConfigError, match="no top-level 'DATASET_INFO"):
        parse_upstream_dataset_info("X = 1\n")


def test_upstream_example_yaml_imports(tmp_path):
    path = tmp_path / "example.yaml"
    path.write_text(UPSTREAM_EXAMPLE_YAML)
    config = load_dataset_config(path)
    assert list(config.groups) == ["t2i_pretrain", "unified_edit", "vlm_sft"]
    vlm = config.groups["vlm_sft"]
    assert vlm.image_transform_args.max_pixels == 2_007_040  # YAML 1.1 integer with underscores
    assert vlm.shuffle_lines is True and vlm.num_used_data == [1000] and vlm.frame_sampler_args.max_num_frames == 12
    edit = config.groups["unified_edit"]
    assert edit.vit_image_transform_args.max_image_size == 518 and edit.is_mandatory is False
    # Round trip through our writer keeps every value.
    config.save(tmp_path / "again.yaml")
    again = load_dataset_config(tmp_path / "again.yaml")
    assert again.groups == {name: group for name, group in config.groups.items()}


@pytest.mark.parametrize(
    "group, key, message",
    [
        ("t2i_pretrain", "shuffle_lines", "unknown key(s) ['shuffle_lines']"),
        ("unified_edit", "vit_image_transform_args", "missing 'vit_image_transform_args'"),
        ("vlm_sft", "frame_sampler_args", "missing 'frame_sampler_args'"),
    ],
)
def test_dataset_config_errors_name_the_key(group, key, message):
    data = yaml.safe_load(UPSTREAM_EXAMPLE_YAML)
    if key in data[group]:
        del data[group][key]
    else:
        data[group][key] = True
    with pytest.raises(ConfigError, match=f"{group}") as err:
        parse_dataset_config(data)
    assert message in str(err.value)


def test_dataset_config_counts_and_weights_are_checked():
    data = yaml.safe_load(UPSTREAM_EXAMPLE_YAML)
    data["t2i_pretrain"]["num_used_data"] = [10, 20]
    with pytest.raises(ConfigError, match="one count per dataset name"):
        parse_dataset_config(data)
    data = yaml.safe_load(UPSTREAM_EXAMPLE_YAML)
    for group in data.values():
        group["weight"] = 0
    with pytest.raises(ConfigError, match="sum of group weights must be > 0"):
        parse_dataset_config(data)


def test_discovered_registry_is_valid_and_round_trips(tmp_path, example_root):
    registry = discover_registry(example_root, tmp_path / "parquet_info")
    assert validate_registry(registry) == []
    edit = registry.get("unified_edit", "seedxedit_multi")
    info = json.loads(edit.parquet_info_path.read_text())
    assert sorted(info) == [f"{edit.data_dir}/chunk_{i}.parquet" for i in range(2)]
    assert (edit.num_files, edit.num_total_samples) == (2, SMALL.edit_samples)
    assert registry.get("vlm_sft", "llava_ov").num_total_samples == SMALL.vlm_lines
    registry.save(tmp_path / "registry.yaml")
    assert Registry.load(tmp_path / "registry.yaml").entries == registry.entries
    config = default_dataset_config(registry)
    config.check_against(registry)
    assert config.groups["t2i_pretrain"].num_used_data == [2]
    assert config.groups["vlm_sft"].num_used_data == [SMALL.vlm_lines]


def _write_registry(tmp_path, body: dict):
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump(body))
    return Registry.load(path)


def test_missing_paths_name_the_key(tmp_path, example_root):
    registry = _write_registry(
        tmp_path,
        {
            "t2i_pretrain": {"t2i": {"data_dir": str(tmp_path / "nope")}},
            "vlm_sft": {
                "llava_ov": {"data_dir": str(example_root / "bagel_example/vlm/images"), "jsonl_path": "missing.jsonl"}
            },
        },
    )
    findings = {(f.dataset, f.key): f.message for f in validate_registry(registry)}
    assert "does not exist" in findings[("t2i_pretrain/t2i", "data_dir")]
    assert str(tmp_path / "missing.jsonl") in findings[("vlm_sft/llava_ov", "jsonl_path")]  # relative to the file


def test_editing_needs_parquet_info_matching_the_footers(tmp_path, example_root):
    data_dir = example_root / "bagel_example/editing/seedxedit_multi"
    registry = _write_registry(tmp_path, {"unified_edit": {"seedxedit_multi": {"data_dir": str(data_dir)}}})
    [finding] = validate_registry(registry)
    assert (finding.key, finding.severity) == ("parquet_info_path", "error") and "missing" in finding.message
    info = {f"{data_dir}/chunk_0.parquet": {"num_row_groups": 5}}
    (tmp_path / "info.json").write_text(json.dumps(info))
    registry = _write_registry(
        tmp_path, {"unified_edit": {"seedxedit_multi": {"data_dir": str(data_dir), "parquet_info_path": "info.json"}}}
    )
    messages = sorted(f.message for f in validate_registry(registry))
    assert "chunk_0.parquet: num_row_groups is 5 but the file footer has 2" in messages[0]
    assert "no entry for" in messages[1] and "chunk_1.parquet" in messages[1]


def test_count_disagreement_is_a_warning(tmp_path, example_root):
    registry = _write_registry(
        tmp_path,
        {
            "t2i_pretrain": {
                "t2i": {"data_dir": str(example_root / "bagel_example/t2i"), "num_files": 10, "num_total_samples": 1000}
            }
        },
    )
    findings = validate_registry(registry)
    assert {(f.key, f.severity) for f in findings} == {("num_files", "warning"), ("num_total_samples", "warning")}
    assert "set num_files: 2" in str(findings[0])
    require_valid(registry)  # warnings do not block


def test_registry_rejects_unknown_groups_and_keys(tmp_path):
    with pytest.raises(ConfigError, match="unknown group 'interleave'"):
        _write_registry(tmp_path, {"interleave": {"x": {"data_dir": "/d"}}})
    with pytest.raises(ConfigError, match=r"t2i_pretrain\.t2i: unknown key\(s\) \['data_path'\]"):
        _write_registry(tmp_path, {"t2i_pretrain": {"t2i": {"data_path": "/d"}}})
    with pytest.raises(ConfigError, match="missing 'data_dir'"):
        _write_registry(tmp_path, {"t2i_pretrain": {"t2i": {"num_files": 1}}})


def test_unreadable_config_files_name_the_file(tmp_path):
    bad_yaml = tmp_path / "registry.yaml"
    bad_yaml.write_text("t2i_pretrain: [unclosed\n")
    with pytest.raises(ConfigError, match=f"{bad_yaml} is not valid YAML"):
        Registry.load(bad_yaml)
    with pytest.raises(ConfigError, match="dataset config .*missing.yaml does not exist"):
        load_dataset_config(tmp_path / "missing.yaml")
    from bagel_core.config.discover import rewrite_parquet_info

    bad_json = tmp_path / "info.json"
    bad_json.write_bytes(b"{\xff}")
    with pytest.raises(ConfigError, match=f"{bad_json} is not valid JSON"):
        rewrite_parquet_info(bad_json, tmp_path)
