"""The Dagster presentation helpers: typed tables and embedded figures."""

from __future__ import annotations

import polars as pl

from assets import presentation


def test_table_types_each_column_by_its_first_non_null_value():
    value = presentation.table([{"name": "vlm", "files": None, "share": 0.123456}, {"name": "t2i", "files": 3}])
    kinds = {c.name: c.type for c in value.schema.columns}
    assert kinds == {"name": "string", "files": "int", "share": "float"}
    assert value.records[0].data == {"name": "vlm", "files": None, "share": 0.1235}
    frame = presentation.table(pl.DataFrame({"a": [1, 2], "b": ["x", "y"]}))
    assert [c.type for c in frame.schema.columns] == ["int", "string"]


def test_figure_embeds_a_png():
    value = presentation.figure(lambda fig: fig.add_subplot().plot([0, 1], [1, 0]), "line")
    assert value.value.startswith("![line](data:image/png;base64,")
