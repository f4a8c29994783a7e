"""Registry validation before anything runs: each problem names the dataset, the key and the fix.

Errors are things upstream would crash or silently mis-train on; warnings are things upstream
tolerates (``num_files``/``num_total_samples`` are never read by its loader, but they are the only
sizes a human sees, so a disagreement is worth knowing).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from bagel_core.config.errors import ConfigError
from bagel_core.config.registry import PLACEHOLDER, DatasetEntry, Registry


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" | "warning"
    dataset: str  # "group/name"
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity.upper()}: {self.dataset}.{self.key}: {self.message}"


def count_jsonl_lines(path: Path) -> int:
    """Non-empty lines, i.e. the records upstream's loader would read."""
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


def parquet_footer_counts(files: list[Path]) -> tuple[int, dict[Path, tuple[int, int]], list[str]]:
    """Total rows, per-file (rows, row groups) from footers only, and unreadable-file messages."""
    total, per_file, problems = 0, {}, []
    for path in files:
        try:
            meta = pq.ParquetFile(path).metadata
        except Exception as exc:  # noqa: BLE001 - any reader error means the footer is unusable
            problems.append(f"{path}: cannot read the parquet footer ({type(exc).__name__}: {exc})")
            continue
        per_file[path] = (meta.num_rows, meta.num_row_groups)
        total += meta.num_rows
    return total, per_file, problems


def _check_entry(entry: DatasetEntry) -> list[Finding]:
    label = f"{entry.group}/{entry.name}"
    findings: list[Finding] = []

    def add(severity: str, key: str, message: str) -> None:
        findings.append(Finding(severity, label, key, message))

    for key in ("data_dir", "parquet_info_path", "jsonl_path", "json_dir"):
        value = getattr(entry, key)
        if value is not None and PLACEHOLDER in str(value):
            add(
                "error",
                key,
                f"still contains the '{PLACEHOLDER}' placeholder ({value}); "
                "replace it with the folder where you extracted the data",
            )
    if findings:
        return findings
    if entry.json_dir is not None:
        add("error", "json_dir", "no upstream dataset class accepts json_dir (it raises TypeError); remove it")
    if not entry.data_dir.is_dir():
        add("error", "data_dir", f"folder {entry.data_dir} does not exist; fix the path or extract the data there")
        return findings

    if entry.is_parquet:
        files = entry.parquet_files()
        if not files:
            add("error", "data_dir", f"no *.parquet files directly inside {entry.data_dir}")
            return findings
        rows, per_file, problems = parquet_footer_counts(files)
        # One corrupt file among many must not stop a pipeline built to quarantine it: the index records it as
        # file_unreadable (its quarantine-ratio check decides whether the rest may go on) and planning leaves it
        # out. Only a dataset with no readable file at all is an error.
        severity = "error" if len(problems) == len(files) else "warning"
        for problem in problems:
            add(severity, "data_dir", f"{problem}; its rows count as unknown, the index quarantines it as "
                "file_unreadable and training never reads it")  # fmt: skip
        if entry.num_files is not None and entry.num_files != len(files):
            add(
                "warning",
                "num_files",
                f"says {entry.num_files} but {entry.data_dir} holds {len(files)} parquet "
                f"files; set num_files: {len(files)}",
            )
        if entry.num_total_samples is not None and not problems and entry.num_total_samples != rows:
            add(
                "warning",
                "num_total_samples",
                f"says {entry.num_total_samples} but the parquet footers count "
                f"{rows} rows; set num_total_samples: {rows}",
            )
        if entry.group == "unified_edit":
            findings += _check_parquet_info(entry, label, per_file)
    else:
        if entry.jsonl_path is None:
            add("error", "jsonl_path", "missing: vlm_sft datasets need the JSONL file with the conversations")
        elif not entry.jsonl_path.is_file():
            add("error", "jsonl_path", f"file {entry.jsonl_path} does not exist")
        else:
            lines = count_jsonl_lines(entry.jsonl_path)
            if entry.num_total_samples is not None and entry.num_total_samples != lines:
                add(
                    "warning",
                    "num_total_samples",
                    f"says {entry.num_total_samples} but {entry.jsonl_path} has "
                    f"{lines} non-empty lines; set num_total_samples: {lines}",
                )
    return findings


def _check_parquet_info(entry: DatasetEntry, label: str, per_file: dict[Path, tuple[int, int]]) -> list[Finding]:
    findings: list[Finding] = []
    if entry.parquet_info_path is None:
        return [
            Finding(
                "error",
                label,
                "parquet_info_path",
                "missing: unified_edit datasets need a parquet_info JSON (`bagel data index` generates one)",
            )
        ]
    if not entry.parquet_info_path.is_file():
        return [Finding("error", label, "parquet_info_path", f"file {entry.parquet_info_path} does not exist")]
    try:
        info = json.loads(entry.parquet_info_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return [Finding("error", label, "parquet_info_path", f"{entry.parquet_info_path} is not valid JSON: {exc}")]
    if not isinstance(info, dict):
        return [
            Finding(
                "error",
                label,
                "parquet_info_path",
                f"{entry.parquet_info_path} must be a JSON object keyed by parquet path",
            )
        ]
    placeholder_keys = [k for k in info if PLACEHOLDER in k]
    if placeholder_keys:
        return [
            Finding(
                "error",
                label,
                "parquet_info_path",
                f"{len(placeholder_keys)} key(s) in "
                f"{entry.parquet_info_path} still contain '{PLACEHOLDER}' (e.g. {placeholder_keys[0]}); "
                "rewrite them or regenerate the file with `bagel data index`",
            )
        ]
    for path, (_rows, row_groups) in per_file.items():
        # Upstream matches by exact string: data_dir joined with the file name.
        key = f"{str(entry.data_dir).rstrip('/')}/{path.name}"
        if key not in info:
            findings.append(
                Finding(
                    "error",
                    label,
                    "parquet_info_path",
                    f"no entry for {key} in {entry.parquet_info_path}: upstream would silently skip this file",
                )
            )
            continue
        declared = info[key].get("num_row_groups") if isinstance(info[key], dict) else None
        if declared != row_groups:
            findings.append(
                Finding(
                    "error",
                    label,
                    "parquet_info_path",
                    f"{key}: num_row_groups is {declared!r} but the file footer has {row_groups}",
                )
            )
    return findings


def validate_registry(registry: Registry) -> list[Finding]:
    """All problems of all entries (empty list: ready to index and train)."""
    findings: list[Finding] = []
    for entry in registry.entries:
        findings += _check_entry(entry)
    return findings


def require_valid(registry: Registry) -> list[Finding]:
    """Raise :class:`ConfigError` listing every error; return the warnings."""
    findings = validate_registry(registry)
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        where = registry.source or "<registry>"
        raise ConfigError(f"{where}: {len(errors)} problem(s):\n" + "\n".join(f"  - {e}" for e in errors))
    return findings
