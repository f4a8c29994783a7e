"""How results look in the Dagster UI: the one place that turns library results into metadata.

``figure``: a matplotlib drawing as a PNG embedded in markdown metadata (the UI renders it inline).
``table``: rows (dicts or a polars frame) as ``MetadataValue.table`` with a typed schema.
``text_block``: a fixed-width text report (the same one the CLI prints) as a markdown code block.
Assets call these and nothing else to describe what they produced.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import dagster as dg
import polars as pl

_COLUMN_TYPES = {bool: "bool", int: "int", float: "float"}


def figure(
    draw: Callable[[Any], None], alt: str, size: tuple[float, float] = (5, 3), dpi: int = 80
) -> dg.MetadataValue:
    """Call ``draw(fig)`` on a fresh Agg figure and embed the PNG in markdown metadata."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=size, dpi=dpi)
    try:
        draw(fig)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
    finally:
        plt.close(fig)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{encoded})")


def table(rows: pl.DataFrame | Sequence[Mapping[str, Any]]) -> dg.MetadataValue:
    """Rows as a Dagster table; floats rounded to 4 digits, each column typed by its first non-null value."""
    records = rows.to_dicts() if isinstance(rows, pl.DataFrame) else [dict(r) for r in rows]
    columns = list(rows.columns) if isinstance(rows, pl.DataFrame) else list(records[0]) if records else []

    def kind(column: str) -> str:
        value = next((r[column] for r in records if r.get(column) is not None), None)
        return _COLUMN_TYPES.get(type(value), "string")

    schema = dg.TableSchema(columns=[dg.TableColumn(c, kind(c)) for c in columns])
    return dg.MetadataValue.table(
        records=[dg.TableRecord({c: _cell(r.get(c)) for c in columns}) for r in records], schema=schema
    )


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


def text_block(text: str) -> dg.MetadataValue:
    """A fixed-width report as a markdown code block."""
    return dg.MetadataValue.md(f"```\n{text}\n```")
