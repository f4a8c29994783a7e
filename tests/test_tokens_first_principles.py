"""Token counts of hand-checked samples of each task, recomputed from first principles and compared with
``token_stats.parquet``.

"First principles" here: image sizes decoded from the files with Pillow, text ids from the Qwen2.5
tokenizer's plain ``encode``, and the documented rules of data-format.md (7.2 resize, 7.3 costs,
7.1 edit spans, 4.3 VLM conversation rules) written out again below, not imported from the project.
Several literal values come straight from the tables of the reference (4096 latents for 1024x1024,
1369 patches for a 518x518 ViT image, ...).
"""

from __future__ import annotations

import json
from fractions import Fraction

import polars as pl
import pyarrow.parquet as pq
import pytest
from stats_fixtures import image_size, write_fixture

from bagel_core.config.dataset_config import load_dataset_config
from bagel_core.config.registry import Registry
from bagel_core.data.tokenizer import load_tokenizer
from bagel_core.stats.token_stats import compute_token_stats


def ref_resize(w, h, max_size, min_size, stride, max_pixels=1_806_336, img_num=1):
    """data-format.md 7.2, transcribed."""

    def div(v):
        return max(stride, round(v / stride) * stride)

    def fit(a, b, k):
        return div(round(a * k)), div(round(b * k))

    k = min(max_size / max(w, h), 1)
    k = max(k, min_size / min(w, h))
    W, H = fit(w, h, k)
    if W * H > max_pixels / img_num:
        W, H = fit(W, H, (max_pixels / img_num) / (W * H))
    if max(W, H) > max_size:
        W, H = fit(W, H, max_size / max(W, H))
    return W, H


def vae_cost(size):
    W, H = ref_resize(*size, 1024, 512, 16)
    return (W // 16) * (H // 16) + 2, W * H // 256


def edit_vit_cost(size):
    W, H = ref_resize(*size, 518, 224, 14)
    return (W // 14) * (H // 14) + 2, W * H // 196


def vlm_vit_cost(size, img_num):
    W, H = ref_resize(*size, 980, 378, 14, 2_007_040, img_num)
    return (W // 14) * (H // 14) + 2, W * H // 196


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()[0]


@pytest.fixture(scope="module")
def stats_run(tmp_path_factory):
    fx = write_fixture(tmp_path_factory.mktemp("fp"))
    result = compute_token_stats(
        Registry.load(fx.registry), load_dataset_config(fx.groups), fx.index_dir, fx.root / "stats", batch_size=3
    )
    return fx, result, pl.read_parquet(result.stats_path)


def _row(stats, source_file, rg, row):
    hit = stats.filter(
        (pl.col("source_file") == str(source_file)) & (pl.col("row_group") == rg) & (pl.col("row_index") == row)
    )
    assert hit.height == 1, f"expected one stats row for {source_file} rg {rg} row {row}"
    return hit.row(0, named=True)


def test_reference_table_literals():
    """The transcribed rule reproduces rows of the reference's table (sanity of the reference itself)."""
    assert vae_cost((1024, 1024))[0] == 4098
    assert vae_cost((640, 480))[0] == 1376 + 2
    assert vae_cost((1920, 1080))[0] == 2304 + 2
    assert edit_vit_cost((1024, 1024))[0] == 1371
    assert vlm_vit_cost((1000, 1000), 1)[0] == 4902
    assert vlm_vit_cost((1000, 1000), 4)[0] == 1369 + 2


def test_t2i_rows_match_first_principles(stats_run, tok):
    fx, _, stats = stats_run
    path = fx.t2i_files[1]
    pf = pq.ParquetFile(path)
    checked = 0
    for rg in range(pf.num_row_groups):
        table = pf.read_row_group(rg).to_pylist()
        for row, rec in enumerate(table):
            size = tuple(image_size(rec["image"]))
            captions = list(json.loads(rec["captions"]).values()) or [" "]
            lens = [len(tok.encode(c)) for c in captions]
            vae_exact, vae_est = vae_cost(size)
            got = _row(stats, path, rg, row)
            assert got["text_tokens"] == max(lens) + 2
            assert got["vae_tokens"] == vae_exact
            assert got["vit_tokens"] == 0
            assert got["total_tokens"] == max(lens) + 2 + vae_exact
            assert got["est_tokens"] == max(lens) + vae_est + 2 * 2
            assert got["total_tokens_min"] == min(lens) + 2 + vae_exact
            assert got["total_tokens_mean"] == pytest.approx(sum(lens) / len(lens) + 2 + vae_exact)
            assert got["mse_tokens"] == vae_exact - 2
            checked += 1
    assert checked == 4
    # hand-checked: 1024x1024 target = 64x64 latents + 2 markers; empty captions -> " " = 1 id
    assert _row(stats, path, 0, 0)["vae_tokens"] == 4098
    empty = _row(stats, path, 1, 0)
    assert empty["text_tokens"] == 3 and empty["vae_tokens"] == 2306


def test_edit_rows_match_first_principles(stats_run, tok):
    fx, _, stats = stats_run
    path = fx.edit_files[0]
    rows = pq.ParquetFile(path).read_row_group(0).to_pylist()

    # row 0: two 1024x1024 images, one step: src VAE + src ViT + instruction + noised target
    sizes = [tuple(image_size(b)) for b in rows[0]["image_list"]]
    lens = [len(tok.encode(t)) for t in rows[0]["instruction_list"][0]]
    got = _row(stats, path, 0, 0)
    assert got["total_tokens"] == 4098 + 1371 + max(lens) + 2 + 4098
    assert got["total_tokens_min"] == 9567 + min(lens) + 2 and got["num_variants"] == len(set(lens))
    assert (got["vae_tokens"], got["vit_tokens"], got["text_tokens"]) == (2 * 4098, 1371, max(lens) + 2)

    # row 1: three images; spans (0,1) 1/4, (0,2)->concat (0,1,"add a cat.") 1/8, (0,2) sequential 1/8,
    # (1,2) 1/2; instruction 2 has two alternatives.
    sizes = [tuple(image_size(b)) for b in rows[1]["image_list"]]
    ins = rows[1]["instruction_list"]
    n = lambda text: len(tok.encode(text))
    vae = [vae_cost(s)[0] for s in sizes]
    vit = [edit_vit_cost(s)[0] for s in sizes]
    totals: list[tuple[Fraction, int]] = []
    totals.append((Fraction(1, 4), vae[0] + vit[0] + n(ins[0][0]) + 2 + vae[1]))
    totals.append((Fraction(1, 8), vae[0] + vit[0] + n(ins[0][0] + ".") + 2 + vae[1]))
    for alt in ins[1]:
        totals.append(
            (Fraction(1, 16), vae[0] + vit[0] + n(ins[0][0]) + 2 + vae[1] + vae[1] + vit[1] + n(alt) + 2 + vae[2])
        )
        totals.append((Fraction(1, 4), vae[1] + vit[1] + n(alt) + 2 + vae[2]))
    assert sum(p for p, _ in totals) == 1
    got = _row(stats, path, 0, 1)
    assert got["total_tokens"] == max(t for _, t in totals)
    assert got["total_tokens_min"] == min(t for _, t in totals)
    assert got["total_tokens_mean"] == pytest.approx(float(sum(p * t for p, t in totals)))
    # the two-step sequential plan has 8 items: its estimate adds 16
    assert got["num_items"] == 8

    # row 2: four 1024x768 images -> worst case is a two-step sequential edit
    got = _row(stats, path, 0, 2)
    step = vae_cost((1024, 768))[0]
    vstep = edit_vit_cost((1024, 768))[0]
    assert step == 3074 and vstep == 1038
    longest_text = max(n("step one") + n("step two"), n("step two") + n("step three")) + 4
    assert got["total_tokens"] == 4 * step + 2 * vstep + longest_text


def test_vlm_rows_match_first_principles(stats_run, tok):
    fx, result, stats = stats_run
    lines = fx.jsonl.read_text().splitlines()
    n = lambda text: len(tok.encode(text))

    got = _row(stats, fx.jsonl, -1, 0)
    assert json.loads(lines[0])["id"] == "a0"
    assert got["vit_tokens"] == 4902  # 1000x1000 -> 980x980 -> 70x70 patches + 2
    assert got["text_tokens"] == n("What colour is the bus?") + 2 + n("It is white and red.") + 2
    assert got["total_tokens"] == got["text_tokens"] + 4902
    assert got["ce_tokens"] == n("It is white and red.") + 1

    # four 1000x1000 images share the pixel budget (518x518 each); two <image> slots -> 2 surplus
    got = _row(stats, fx.jsonl, -1, 1)
    per_image, per_image_est = vlm_vit_cost((1000, 1000), 4)
    assert per_image == 1371
    texts = ["Compare", "and", ".", "The first is larger."]
    assert got["vit_tokens"] == 2 * per_image
    assert got["text_tokens"] == sum(n(t) + 2 for t in texts)
    assert got["est_tokens"] == sum(n(t) for t in texts) + 4 * per_image_est + 2 * 6

    got = _row(stats, fx.jsonl, -1, 2)
    assert got["total_tokens"] == n("Say hello.") + 2 + n("Hello!") + 2 and got["vit_tokens"] == 0

    skipped = pl.read_parquet(result.skipped_path)
    assert skipped.filter(pl.col("row_index") == 3)["reason"].to_list() == [
        "no loss-bearing (gpt) text; upstream prints 'No loss defined, skipped.'"
    ]


def test_accounting_is_complete(stats_run):
    fx, result, stats = stats_run
    index = pl.read_parquet(fx.index_dir / "index.parquet")
    assert result.num_counted + result.num_skipped + result.num_quarantined == index.height
    assert result.num_quarantined == 1
    summary = result.summary
    assert int(summary["count"].sum()) == result.num_counted
    assert int(summary["quarantined"].sum()) == 1 and int(summary["skipped"].sum()) == result.num_skipped
    t2i = summary.filter(pl.col("task") == "t2i").row(0, named=True)
    t2i_rows = stats.filter(pl.col("task") == "t2i")
    assert t2i["total_tokens_sum"] == t2i_rows["total_tokens"].sum()
    assert t2i["total_tokens_max"] == t2i_rows["total_tokens"].max()
