"""Packed training dataset: the batch contract of data-format.md 11, positions/modes of 9, token
counts equal to ``token_stats.parquet``, bad samples counted, and a model step on a real pack."""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import random

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from packed_fixtures import (
    NO_DROPOUT,
    SMALL_EDIT_VIT,
    SMALL_VAE,
    SMALL_VLM_VIT,
    make_dataset,
    make_manifest,
    small_fixture,
)
from PIL import Image

from bagel_core.config.dataset_config import load_dataset_config
from bagel_core.config.errors import ConfigError, DataError
from bagel_core.config.image_args import ImageTransformArgs
from bagel_core.config.registry import Registry
from bagel_core.data.transforms import ImageTransform
from bagel_core.loader.packed_dataset import PackBuilder, model_inputs
from bagel_core.loader.readers import LoadedSample
from bagel_core.plan.packing import PackingParams
from bagel_core.sequence.tokens import EditSpan, build_edit_plan, build_t2i_plan, build_vlm_plan, count_tokens

BOS, EOS, SOI, EOI = 151644, 151645, 151652, 151653
TOKEN_IDS = {"bos_token_id": BOS, "eos_token_id": EOS, "start_of_image": SOI, "end_of_image": EOI}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    fx = small_fixture(root / "data")
    return fx, make_manifest(fx, root / "manifest")


# ---- invariants ------------------------------------------------------------------------------------
def check_batch(batch: dict) -> None:
    """Every invariant of data-format.md 11 that holds for any pack (no flex padding)."""
    L = batch["sequence_length"]
    lens = batch["sample_lens"]
    assert sum(lens) == L and all(n > 0 for n in lens)
    text_idx = batch["packed_text_indexes"]
    text_ids = batch["packed_text_ids"]
    assert text_ids.dtype == torch.long and text_idx.dtype == torch.long and text_ids.shape == text_idx.shape
    assert batch["packed_position_ids"].shape == (L,) and batch["packed_position_ids"].dtype == torch.long
    parts = [text_idx]
    vae_idx = batch.get("packed_vae_token_indexes", torch.empty(0, dtype=torch.long))
    vit_idx = batch.get("packed_vit_token_indexes", torch.empty(0, dtype=torch.long))
    parts += [vae_idx, vit_idx]
    # the three index sets partition [0, L)
    assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(L))
    # splits tile the samples; modes known
    splits, modes = batch["split_lens"], batch["attn_modes"]
    assert len(splits) == len(modes) and set(modes) <= {"causal", "full", "noise"}
    bounds, acc = [], 0
    for n in lens:
        acc += n
        bounds.append(acc)
    acc, covered = 0, []
    for n in splits:
        acc += n
        covered.append(acc)
    assert set(bounds) <= set(covered) and covered[-1] == L
    # text ids at their positions: every causal split is <|im_start|> ... <|im_end|>, every image split
    # starts with <|vision_start|> and ends with <|vision_end|>
    at = torch.full((L,), -1, dtype=torch.long)
    at[text_idx] = text_ids
    start = 0
    for n, mode in zip(splits, modes):
        if mode == "causal":
            assert at[start] == BOS and at[start + n - 1] == EOS and (at[start : start + n] >= 0).all()
        else:
            assert at[start] == SOI and at[start + n - 1] == EOI and (at[start + 1 : start + n - 1] == -1).all()
        start += n
    # VAE fields
    if "padded_images" in batch:
        imgs = batch["padded_images"]
        shapes = batch["patchified_vae_latent_shapes"]
        assert imgs.dtype == torch.float32 and imgs.shape[0] == len(shapes) and imgs.shape[1] == 3
        assert imgs.abs().max() <= 1.0 + 1e-5
        assert max(h for h, _ in shapes) * 16 == imgs.shape[2] and max(w for _, w in shapes) * 16 == imgs.shape[3]
        n_z = sum(h * w for h, w in shapes)
        assert vae_idx.shape == (n_z,) and batch["packed_latent_position_ids"].shape == (n_z,)
        taus = batch["packed_timesteps"]
        assert taus.shape == (n_z,) and taus.dtype == torch.float32
        mse = batch["mse_loss_indexes"]
        noised = vae_idx[torch.isfinite(taus)]
        assert torch.equal(mse, noised) and torch.isneginf(taus[~torch.isfinite(taus)]).all()
    else:
        assert vae_idx.numel() == 0
    # ViT fields
    if "packed_vit_tokens" in batch:
        toks, seqlens = batch["packed_vit_tokens"], batch["vit_token_seqlens"]
        assert toks.dtype == torch.float32 and toks.shape == (int(seqlens.sum()), 588)
        assert batch["packed_vit_position_ids"].shape == (toks.shape[0],) and vit_idx.shape == (toks.shape[0],)
        assert int(batch["packed_vit_position_ids"].max()) < 70 * 70
    # CE fields: label = the text id of the next position
    if "ce_loss_indexes" in batch:
        ce, labels, w = batch["ce_loss_indexes"], batch["packed_label_ids"], batch["ce_loss_weights"]
        assert ce.shape == labels.shape == w.shape and w.dtype == torch.float32
        assert torch.equal(labels, at[ce + 1]) and (at[ce] >= 0).all()
    # one resume cursor per sample, lengths equal to the token accounting
    dix = batch["batch_data_indexes"]
    assert [d["num_tokens"] for d in dix] == lens
    assert all(set(d) >= {"data_indexes", "worker_id", "dataset_name"} for d in dix)


def test_batches_satisfy_the_packed_batch_contract(data):
    fx, manifest = data
    ds = make_dataset(fx, manifest)  # default CFG dropout: dropped items occur
    batches = list(itertools.islice(iter(ds), 12))
    dropped = 0
    for batch in batches:
        check_batch(batch)
        assert batch["sequence_length"] >= 128 or batch["data_state"]["counters"]["discarded_on_overflow"]
        dropped += sum(len(d["dropped"]) for d in batch["batch_data_indexes"])
        # mandatory groups open every pack, in YAML order
        assert [d["dataset_name"] for d in batch["batch_data_indexes"][:2]] == ["t2i_pretrain", "vlm_sft"]
    assert dropped > 0
    groups = {d["dataset_name"] for b in batches for d in b["batch_data_indexes"]}
    assert groups == {"t2i_pretrain", "unified_edit", "vlm_sft"}
    # the fixture's VLM record without a gpt turn is skipped and counted every time it is read, nothing else
    skipped = ds.counters()["skipped"]
    reason = "no loss-bearing (gpt) text; upstream prints 'No loss defined, skipped.'"
    assert list(skipped) == ["vlm_sft"] and list(skipped["vlm_sft"]) == [reason] and skipped["vlm_sft"][reason] >= 2


def test_nested_masks_and_flex_padding(data):
    fx, manifest = data
    ds = make_dataset(fx, manifest, nested_masks=True, flex_padding=True, dropout=NO_DROPOUT)
    batch = next(iter(ds))
    L = batch["sequence_length"]
    assert sum(batch["sample_lens"]) == 192 and batch["sample_lens"][-1] == 192 - L
    assert batch["split_lens"][-1] == 192 - L and batch["attn_modes"][-1] == "causal"
    masks = batch["nested_attention_masks"]
    assert [m.shape[0] for m in masks] == batch["sample_lens"][:-1]
    # the T2I sample (first): caption causal, then its noised image sees the caption and itself
    first = masks[0]
    n_text = batch["split_lens"][0]
    assert torch.isneginf(first[0, 1]) and first[1, 0] == 0
    assert (first[n_text:, :] == 0).all()


# ---- hand-checked positions and modes (9.1, 9.2) ---------------------------------------------------
def _sample(group: str, plan, sizes) -> LoadedSample:
    images = [Image.new("RGB", s, (10 * i, 50, 90)) for i, s in enumerate(sizes)]
    return LoadedSample(0, group, "d", (0, 0, 0), 0, 0, plan, images, count_tokens(plan), "f", 0, 0)


def _builder(interpolate: bool = False) -> PackBuilder:
    vae, vit = ImageTransformArgs(**SMALL_VAE), ImageTransformArgs(**SMALL_EDIT_VIT)
    vlm = ImageTransformArgs(**SMALL_VLM_VIT)
    transforms = {
        ("t2i", "vae_image"): ImageTransform.from_args(vae),
        ("edit", "vae_image"): ImageTransform.from_args(vae),
        ("edit", "vit_image"): ImageTransform.from_args(vit),
        ("vlm", "vit_image"): ImageTransform.from_args(vlm),
    }
    return PackBuilder(TOKEN_IDS, 64, 70, interpolate, transforms, {"vlm"})


def test_positions_and_modes_t2i_edit_vlm_by_hand():
    vae, vit = ImageTransformArgs(**SMALL_VAE), ImageTransformArgs(**SMALL_EDIT_VIT)
    vlm_args = ImageTransformArgs(**SMALL_VLM_VIT)
    b = _builder()
    rng = random.Random(0)
    # T2I: 3-id caption (5 tokens, causal, RoPE 0..4) + 64x48 noised image (4x3 latents, RoPE 5)
    t2i = _sample("t2i", build_t2i_plan([11, 12, 13], (640, 480), vae), [(640, 480)])
    assert b.add(t2i, set(), rng) == 5 + 14
    # edit, two steps sequential, source VAE dropped: 64x64 images (4x4 latents), 56x56 ViT (4x4 patches)
    plan = build_edit_plan([(64, 64)] * 3, EditSpan(0, 2, False), [[21, 22], [23]], vae, vit)
    assert [(i.kind, i.loss) for i in plan.items] == [
        ("vae_image", False),
        ("vit_image", False),
        ("text", False),
        ("vae_image", True),
        ("vae_image", False),
        ("vit_image", False),
        ("text", False),
        ("vae_image", True),
    ]
    edit = _sample("edit", plan, [(64, 64)] * 3)
    assert b.add(edit, {0}, rng) == 18 + 4 + 18 + 18 + 18 + 3 + 18
    # VLM: one 56x56 image, question (2 ids), answer (3 ids, loss)
    rec = {"image": "x.png", "conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]}
    ids = {"q": [31, 32], "a": [41, 42, 43]}
    vplan = build_vlm_plan(rec, [(56, 56)], vlm_args, lambda t: ids[t])
    vlm = _sample("vlm", vplan, [(56, 56)])
    assert b.add(vlm, set(), rng) == 18 + 4 + 5
    batch = b.finish(nested_masks=False, pad_to=None)
    check_batch(batch)
    assert batch["sample_lens"] == [19, 97, 27]
    pos = batch["packed_position_ids"].tolist()
    # T2I: text 0..4, image all 5 (noised: the counter does not advance)
    assert pos[:19] == [0, 1, 2, 3, 4] + [5] * 14
    # edit: dropped source VAE advances RoPE (0 -> ViT at 1); text 2..5; noised image 1 at 6 (no advance);
    # clean copy of image 1 at 6; its ViT at 7; text 8..10; noised target at 11
    e = pos[19 : 19 + 97]
    assert e == [1] * 18 + [2, 3, 4, 5] + [6] * 18 + [6] * 18 + [7] * 18 + [8, 9, 10] + [11] * 18
    assert batch["attn_modes"] == [
        "causal",
        "noise",
        "full",
        "causal",
        "noise",
        "full",
        "full",
        "causal",
        "noise",
        "full",
        "causal",
        "causal",
    ]
    # VLM: image 0, question 1..4, answer 5..9
    assert pos[116:] == [0] * 18 + [1, 2, 3, 4] + [5, 6, 7, 8, 9]
    # text ids: T2I caption wrapped; CE on the answer's <|im_start|> + ids, labels ids + <|im_end|>
    assert batch["packed_text_ids"][:7].tolist() == [BOS, 11, 12, 13, EOS, SOI, EOI]
    assert batch["packed_text_indexes"][:7].tolist() == [0, 1, 2, 3, 4, 5, 18]
    assert batch["ce_loss_indexes"].tolist() == [138, 139, 140, 141]
    assert batch["packed_label_ids"].tolist() == [41, 42, 43, EOS]
    assert torch.allclose(batch["ce_loss_weights"], torch.full((4,), 1 / math.sqrt(4)))
    # 2-D ids: T2I latent grid 3 rows x 4 cols with M = 64; ViT 4x4 with M = 70
    assert batch["patchified_vae_latent_shapes"][0] == (3, 4)
    assert batch["packed_latent_position_ids"][:12].tolist() == [r * 64 + c for r in range(3) for c in range(4)]
    assert batch["packed_vit_position_ids"][:16].tolist() == [r * 70 + c for r in range(4) for c in range(4)]
    # timesteps: finite and shared within a noised image, -inf for the clean copy
    taus = batch["packed_timesteps"]
    assert torch.isfinite(taus[:12]).all() and len(set(taus[:12].tolist())) == 1
    assert torch.isneginf(taus[12 + 16 : 12 + 32]).all()  # edit: noised img1 (16), then its clean copy (16)
    assert batch["mse_loss_indexes"][:12].tolist() == list(range(6, 18))
    # ViT patches are channel-last 14x14x3 vectors of the resized image
    patches = batch["packed_vit_tokens"][:16].view(16, 14, 14, 3)
    pixels = ImageTransform.from_args(vit)(edit.images[0])
    assert torch.equal(patches[5], pixels[:, 14:28, 14:28].permute(1, 2, 0))


def test_interpolated_patch_ids():
    b = _builder(interpolate=True)
    vae = ImageTransformArgs(**SMALL_VAE)
    b.add(_sample("t2i", build_t2i_plan([1], (64, 48), vae), [(64, 48)]), set(), random.Random(0))
    batch = b.finish(nested_masks=False, pad_to=None)
    # rows 3, cols 4 in a 64-table: bucket(k/n) = number of j/64 <= k/n
    rows = [sum(1 for j in range(1, 64) if j / 64 <= k / 3) for k in range(3)]
    cols = [sum(1 for j in range(1, 64) if j / 64 <= k / 4) for k in range(4)]
    assert batch["packed_latent_position_ids"].tolist() == [r * 64 + c for r in rows for c in cols]


# ---- token counts equal token_stats.parquet (issue 5 Must-show) ------------------------------------
def test_packed_token_counts_equal_token_stats(tmp_path):
    from bagel_core.stats.token_stats import SKIPPED_FILE, compute_token_stats

    fx = small_fixture(tmp_path / "data", vlm_copies=2)
    manifest = make_manifest(fx, tmp_path / "manifest")
    config, registry = load_dataset_config(fx.groups), Registry.load(fx.registry)
    params = PackingParams(
        expected_num_tokens=300,
        max_num_tokens=400,
        max_num_tokens_per_sample=400,
        prefer_buffer_before=100,
        max_buffer_size=4,
    )
    result = compute_token_stats(registry, config, fx.index_dir, tmp_path / "stats", max_num_tokens_per_sample=400)
    stats = pl.read_parquet(result.stats_path)
    assert not stats["over_cap"].any()
    by_key = {
        (os.path.realpath(r["source_file"]), r["row_group"], r["row_index"]): r for r in stats.iter_rows(named=True)
    }
    quarantined = {(os.path.realpath(str(fx.t2i_files[0])), 0, 1)}  # index row 1 (see write_fixture)
    ds = make_dataset(fx, manifest, params=params, dropout=NO_DROPOUT)
    seen: dict[tuple, set] = {}
    compared = 0
    multi = {k for k, r in by_key.items() if r["num_variants"] > 1}
    packs = 0
    for batch in itertools.islice(iter(ds), 60):
        packs += 1
        if set(seen) == set(by_key) and any(len(seen[k]) > 1 for k in multi):
            break
        for d in batch["batch_data_indexes"]:
            key = (os.path.realpath(d["source_file"]), d["row_group"], d["row_index"])
            if key in quarantined:
                continue
            row = by_key[key]
            pair = (d["num_tokens"], d["est_tokens"])
            assert pair in set(zip(row["variant_total"], row["variant_est"])), (key, pair, row)
            if row["num_variants"] == 1:
                assert pair == (row["total_tokens"], row["est_tokens"])
            seen.setdefault(key, set()).add(pair)
            compared += 1
    assert set(seen) == set(by_key)  # every counted sample was packed
    # multi-variant samples (caption / edit-span draws): the packer produced more than one variant
    assert multi and any(len(seen[k]) > 1 for k in multi)
    print(f"compared {compared} packed samples ({len(by_key)} distinct) with token_stats over {packs} packs")
    # what the statistics could not count, the dataset skipped, for the same reason
    stat_skips = pl.read_parquet(tmp_path / "stats" / SKIPPED_FILE)
    ds_skips = ds.counters()["skipped"]
    for rec in stat_skips.iter_rows(named=True):
        assert rec["reason"] in ds_skips[rec["group"]]
    assert compared >= 2 * len(by_key)


# ---- bad samples -----------------------------------------------------------------------------------
def _corrupt_first_image(path) -> None:
    table = pq.read_table(path)
    images = table.column("image").to_pylist()
    images[0] = b"\x89PNG\r\n\x1a\n this is not an image"
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    pq.write_table(table, path, row_group_size=2)


def test_bad_samples_are_skipped_and_counted(tmp_path):
    fx = small_fixture(tmp_path / "data")
    _corrupt_first_image(fx.t2i_files[0])
    fx.edit_files[1].write_bytes(b"garbage, not parquet")
    manifest = make_manifest(fx, tmp_path / "manifest")  # planned on the data as it is (bad parts included)
    ds = make_dataset(fx, manifest)
    batches = list(itertools.islice(iter(ds), 10))
    for batch in batches:
        check_batch(batch)
    skipped = ds.counters()["skipped"]
    t2i = skipped["t2i_pretrain"]
    assert t2i == {"image decode error (UnidentifiedImageError)": t2i["image decode error (UnidentifiedImageError)"]}
    assert t2i["image decode error (UnidentifiedImageError)"] >= 1
    edit = skipped["unified_edit"]
    assert len(edit) == 1 and next(iter(edit)).startswith("unit unreadable: cannot open")
    bad_file = os.path.realpath(fx.edit_files[1])
    packed = [d for b in batches for d in b["batch_data_indexes"]]
    assert not any(os.path.realpath(d["source_file"]) == bad_file for d in packed)
    assert not any(
        os.path.realpath(d["source_file"]) == os.path.realpath(fx.t2i_files[0])
        and (d["row_group"], d["row_index"]) == (0, 0)
        for d in packed
    )


def test_group_without_any_usable_sample_fails_loudly(tmp_path):
    fx = small_fixture(tmp_path / "data")
    manifest = make_manifest(fx, tmp_path / "manifest")
    for path in fx.t2i_files:
        path.write_bytes(b"not parquet")
    ds = make_dataset(fx, manifest)
    with pytest.raises(DataError, match="3 full passes .* gave no usable sample"):
        next(iter(ds))


def test_a_group_that_fits_beside_no_mandatory_fill_fails_loudly(data):
    # carry: the two mandatory samples alone fill max_num_tokens, so no other draw ever fits; each is
    # skipped (counted as unfit) and after MAX_EMPTY_PASSES passes the worker names the group and the cause
    fx, manifest = data
    params = PackingParams(expected_num_tokens=40, max_num_tokens=40, max_num_tokens_per_sample=200)
    ds = make_dataset(fx, manifest, params=params, dropout=NO_DROPOUT)
    with pytest.raises(DataError, match=r"(unified_edit|vlm_sft): 3 full passes .*fits no pack"):
        next(iter(ds))


def test_worker_count_must_match_manifest(data):
    fx, manifest = data
    with pytest.raises(ConfigError, match="num_workers"):
        make_dataset(fx, manifest, num_workers=2)


# ---- the model consumes a produced pack --------------------------------------------------------------
def test_tiny_model_forward_backward_on_a_produced_pack(data):
    from bagel_core.model import AutoEncoder, build_model, preset

    fx, manifest = data
    ds = make_dataset(fx, manifest, dropout=NO_DROPOUT)
    batch = ds.record(next(iter(ds)))
    assert {"padded_images", "packed_vit_tokens", "ce_loss_indexes"} <= set(batch)
    torch.manual_seed(0)
    cfg = preset("tiny")
    model = build_model(cfg)
    with torch.no_grad():
        model.llm2vae.weight.normal_(0, 0.02)
    vae = AutoEncoder(cfg.vae).eval()
    inputs = model_inputs(batch)
    with torch.no_grad():
        inputs["padded_latent"] = vae.encode(inputs.pop("padded_images"), generator=torch.Generator().manual_seed(0))
    terms = model(**inputs, noise_generator=torch.Generator().manual_seed(1))
    assert terms.ce is not None and terms.ce.shape == batch["ce_loss_indexes"].shape
    assert terms.mse is not None and terms.mse.shape == (batch["mse_loss_indexes"].numel(), 64)
    loss = (terms.ce * batch["ce_loss_weights"]).sum() / batch["ce_loss_weights"].sum() + terms.mse.mean()
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.llm2vae.weight.grad.abs().sum() > 0 and model.vit_model is not None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.connector.parameters())


def test_state_is_plain_data(data):
    fx, manifest = data
    ds = make_dataset(fx, manifest)
    for _ in itertools.islice(iter(ds), 3):
        pass
    state = ds.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == state
    json.dumps(state)  # JSON-able too (worker ids become strings there)
    assert set(state["data_status"]) == {"t2i_pretrain", "unified_edit", "vlm_sft"}
    assert all(set(v) == {0} for v in state["data_status"].values())


# ---- the manifest is what is read ----------------------------------------------------------------------
def test_each_rank_reads_exactly_its_manifest_units_and_logs_repeats(tmp_path, caplog):
    from bagel_core.plan.manifest import read_manifest

    fx = small_fixture(tmp_path / "data", vlm_copies=2)
    manifest = make_manifest(fx, tmp_path / "manifest", world_size=2)
    seen_by_rank = []
    for rank in range(2):
        units = read_manifest(manifest, rank, 0, world_size=2, num_workers=0)
        allowed = {
            (
                os.path.realpath(u.source_file),
                u.row_group if u.group == "unified_edit" else None,
                u.line if u.group == "vlm_sft" else None,
            )
            for us in units.values()
            for u in us
        }
        ds = make_dataset(fx, manifest, rank=rank, world_size=2)
        with caplog.at_level("INFO", logger="bagel_core.loader.packed_dataset"):
            batches = list(itertools.islice(iter(ds), 6))
        seen = set()
        for d in (d for b in batches for d in b["batch_data_indexes"]):
            group = d["dataset_name"]
            key = (
                os.path.realpath(d["source_file"]),
                d["row_group"] if group == "unified_edit" else None,
                d["row_index"] if group == "vlm_sft" else None,
            )
            assert key in allowed
            seen.add(key)
        seen_by_rank.append(seen)
        assert f"t2i_pretrain repeat in rank-{rank} worker-0" in caplog.text
        assert f"rank-{rank} worker-0 dataset-vlm_sft: resuming data at 0" in caplog.text
    assert not seen_by_rank[0] & seen_by_rank[1]  # ranks read disjoint units


def read_accounting(state: dict) -> tuple[int, int]:
    """(records read, records accounted for): every record a worker read was packed, skipped for a counted
    reason, passed over as quarantined, discarded by an overflow flush, or is still in the buffer."""
    c = state["counters"]
    read = sum(s["reads"] for s in state["streams"].values())
    per_reason = sum(n for key in ("skipped", "quarantined") for reasons in c[key].values() for n in reasons.values())
    settled = sum(c["packed"].values()) + per_reason + sum(c["discarded_on_overflow"].values())
    return read, settled + len(state["buffer"])


@pytest.mark.parametrize("mode", ["upstream", "carry"])
def test_overflow_samples_are_discarded_upstream_and_carried_otherwise(data, mode):
    # the fine-tune recipe pattern (prefer_buffer_before > max_num_tokens): a sample that does not fit is
    # buffered, popped at once and overflows again; upstream discards it (counted, never silent), carry
    # flushes the pack and opens the next one with it
    fx, manifest = data
    params = PackingParams(
        expected_num_tokens=128,
        max_num_tokens=150,
        max_num_tokens_per_sample=150,
        prefer_buffer_before=1000,
        max_buffer_size=50,
        mode=mode,
    )
    ds = make_dataset(fx, manifest, params=params, dropout=NO_DROPOUT)
    batches = list(itertools.islice(iter(ds), 12))
    for batch in batches:
        check_batch(batch)
        assert batch["sequence_length"] <= 150 + 80  # mandatory fill is not capped (8.2 step 1)
        read, accounted = read_accounting(batch["data_state"])
        assert read == accounted
    counters = ds.counters()
    discarded = sum(counters["discarded_on_overflow"].values())
    carried = sum(counters["carried"].values())
    overflow_packs = [b for b in batches if b["sequence_length"] < 128]
    assert overflow_packs  # packs flushed by an overflow are shorter than expected_num_tokens
    if mode == "upstream":
        assert discarded > 0 and carried == 0 and sum(counters["buffered"].values()) >= discarded
        return
    assert discarded == 0 and carried > 0
    assert all(b["sequence_length"] <= 150 for b in batches)  # the mandatory fill is small here
    # a sample carried out of a pack waits at the buffer's front and opens the next pack, right after the
    # mandatory samples (unless it fits beside them in no pack: then it is skipped, counted)
    checked = 0
    for before, after in itertools.pairwise(batches):
        pending = before["data_state"]["buffer"]
        if not pending:
            continue
        checked += 1
        opener = after["batch_data_indexes"][2]  # after t2i_pretrain and vlm_sft (mandatory)
        unfit = [
            sum(b["data_state"]["counters"]["skipped"].get(pending[0]["group"], {}).values()) for b in (before, after)
        ]
        assert (opener["dataset_name"], opener["data_indexes"]) == (pending[0]["group"], _cursor(pending[0])) or (
            unfit[1] > unfit[0]
        )
    assert checked


def _cursor(ref: dict):
    """Upstream's data_indexes of a buffered sample reference (readers.UnitStream.cursor)."""
    unit, block, row = ref["position"]
    return {"t2i_pretrain": [unit, block, row], "unified_edit": [unit, row]}.get(ref["group"], unit)
