"""Plan builders and ``count_tokens`` on the reference's worked examples (no tokenizer needed)."""

from __future__ import annotations

import random
from collections import Counter
from fractions import Fraction

import pytest

from bagel_core.config.image_args import ImageTransformArgs
from bagel_core.sequence.tokens import (
    VAE_IMAGE,
    VIT_IMAGE,
    EditSpan,
    PlanItem,
    SamplePlan,
    SampleRejected,
    build_vlm_plan,
    count_tokens,
    edit_plan_variants,
    edit_span_distribution,
    sample_edit_plan,
    sample_t2i_plan,
    summarise_variants,
    t2i_caption_texts,
    t2i_plan_variants,
    vlm_elements,
)

VAE = ImageTransformArgs(max_image_size=1024, min_image_size=512, image_stride=16)
EDIT_VIT = ImageTransformArgs(max_image_size=518, min_image_size=224, image_stride=14)
VLM_VIT = ImageTransformArgs(max_image_size=980, min_image_size=378, image_stride=14, max_pixels=2_007_040)


def fake_ids(text: str) -> list[int]:
    """One id per whitespace-separated word: lengths are obvious in the tests."""
    return list(range(len(text.split())))


def words(n: int) -> str:
    return " ".join(["w"] * n)


def test_t2i_worked_example():
    """7.4: 1024x1024 image, 60-token caption -> 62 + 4098 = 4160; estimate 4096 + 60 + 2*2 = 4160."""
    ((p, plan),) = t2i_plan_variants('{"c": "' + words(60) + '"}', (1024, 1024), VAE, fake_ids)
    count = count_tokens(plan)
    assert p == 1 and count.total == 4160 and count.estimate == 4160
    assert (count.text_tokens, count.vae_tokens, count.mse_tokens, count.ce_tokens) == (62, 4098, 4096, 0)
    assert count.max_latent_side == 64
    # caption dropped by CFG: only the 4098-token noise split remains; the estimate is unchanged
    dropped = count_tokens(plan, dropped=[0])
    assert dropped.total == 4098 and dropped.estimate == 4160
    assert (count.cfg_text, count.cfg_vit, count.cfg_vae) == ((62,), (), ())  # only the caption is droppable


def test_vlm_worked_example():
    """7.4: one 980x980 image, 20-token question, 50-token answer -> 4902 + 22 + 52 = 4976."""
    record = {
        "image": "x.jpg",
        "conversations": [{"from": "human", "value": "<image>\n" + words(20)}, {"from": "gpt", "value": words(50)}],
    }
    count = count_tokens(build_vlm_plan(record, [(980, 980)], VLM_VIT, fake_ids))
    assert count.total == 4976 and count.vit_tokens == 4902 and count.ce_tokens == 51


def test_edit_worked_example():
    """7.4: one step at 1024 px, 12-token instruction -> 4098 + 1371 + 14 + 4098 = 9581."""
    ((p, plan),) = edit_plan_variants([[words(12)]], [(1024, 1024), (1024, 1024)], VAE, EDIT_VIT, fake_ids)
    count = count_tokens(plan)
    assert p == 1 and count.total == 9581
    assert [i.kind for i in plan.items] == [VAE_IMAGE, VIT_IMAGE, "text", VAE_IMAGE]
    assert [i.loss for i in plan.items] == [False, False, False, True]
    assert [i.enable_cfg for i in plan.items] == [True, True, True, False]
    assert (count.cfg_text, count.cfg_vit, count.cfg_vae) == ((14,), (1371,), (4098,))


def test_two_step_sequential_edit_exceeds_default_cap():
    """7.4: a two-step sequential edit at 1024 px costs about 19,150 tokens (> 16,384)."""
    sizes = [(1024, 1024)] * 3
    cost = summarise_variants(edit_plan_variants([["a b c"], ["d e f"]], sizes, VAE, EDIT_VIT, fake_ids))
    assert cost.worst.total == 4 * 4098 + 2 * 1371 + 2 * 5 and cost.worst.estimate > 16_384


@pytest.mark.parametrize("n", [2, 3, 4, 5, 7])
def test_edit_span_distribution_is_a_distribution(n):
    dist = edit_span_distribution(n)
    assert sum(p for p, _ in dist) == 1
    for _, span in dist:
        assert 0 <= span.start < span.end <= n - 1 and span.end - span.start <= 2
        if span.concatenated:
            assert span.end - span.start <= 2


def test_edit_span_distribution_three_images():
    dist = {s: p for p, s in edit_span_distribution(3)}
    # start 0 (1/2): end 1 (1/4) or end 2 (1/4 -> concatenated 1/8, pulled back to end 1; sequential 1/8)
    assert dist == {
        EditSpan(0, 1, False): Fraction(1, 4),
        EditSpan(0, 1, True): Fraction(1, 8),
        EditSpan(0, 2, False): Fraction(1, 8),
        EditSpan(1, 2, False): Fraction(1, 2),
    }


def test_sampled_edit_plans_follow_the_enumerated_distribution():
    """The per-visit builder (packed dataset) and the enumeration (statistics) agree."""
    sizes = [(512, 512), (640, 480), (512, 512), (1024, 768)]
    ins = [["a"], ["b c", "d e f"], ["g h i j"]]
    variants = edit_plan_variants(ins, sizes, VAE, EDIT_VIT, fake_ids)
    expected: Counter = Counter()
    for p, plan in variants:
        expected[plan] += p
    rng = random.Random(0)
    draws = Counter(sample_edit_plan(ins, sizes, VAE, EDIT_VIT, fake_ids, rng) for _ in range(4000))
    assert set(draws) <= set(expected)
    for plan, p in expected.items():
        assert abs(draws[plan] / 4000 - float(p)) < 0.03


def test_t2i_caption_rules():
    assert t2i_caption_texts("{}") == [" "]
    assert t2i_caption_texts('{"a": "x", "b": "y"}') == ["x", "y"]
    for bad, reason in (("[1]", "not an object"), ("{oops", "not valid JSON"), ('{"a": 1}', "non-string")):
        with pytest.raises(SampleRejected, match=reason):
            t2i_caption_texts(bad)
    plan = sample_t2i_plan('{"a": "x y", "b": "z"}', (256, 256), VAE, fake_ids, random.Random(1))
    assert count_tokens(plan).vae_tokens == 32 * 32 + 2  # 256 -> 512 (short-edge floor)


def test_vlm_conversation_rules():
    # surplus <image> dropped; surplus images only in the estimate; roles other than human/gpt ignored
    record = {
        "image": ["a", "b", "c"],
        "conversations": [
            {"from": "system", "value": "ignored words"},
            {"from": "human", "value": "<image> look <image>"},
            {"from": "gpt", "value": "  spaced answer  "},
        ],
    }
    elements = vlm_elements(record["conversations"], 3)
    assert [(e.kind, e.text) for e in elements] == [
        ("vit_image", ""),
        ("text", "look"),
        ("vit_image", ""),
        ("text", "  spaced answer  "),
    ]
    plan = build_vlm_plan(record, [(1000, 1000)] * 3, VLM_VIT, fake_ids)
    count = count_tokens(plan)
    assert len(plan.unplaced_images) == 1
    per = VLM_VIT.resized_size(1000, 1000, 3)
    assert count.vit_tokens == 2 * ((per[0] // 14) * (per[1] // 14) + 2)
    assert count.estimate == 3 * (per[0] * per[1] // 196) + 1 + 2 + 2 * 4
    # more <image> placeholders than images in one turn: only idx < num_images get a slot
    two = {
        "image": "a",
        "conversations": [{"from": "human", "value": "<image><image>x"}, {"from": "gpt", "value": "y"}],
    }
    assert sum(i.kind == VIT_IMAGE for i in build_vlm_plan(two, [(500, 500)], VLM_VIT, fake_ids).items) == 1
    # per-turn counting can place more slots than images: upstream would crash -> rejected
    per_turn = {
        "image": "a",
        "conversations": [
            {"from": "human", "value": "<image>x"},
            {"from": "gpt", "value": "y"},
            {"from": "human", "value": "<image>z"},
            {"from": "gpt", "value": "w"},
        ],
    }
    with pytest.raises(SampleRejected, match="more than 1 image"):
        build_vlm_plan(per_turn, [(500, 500)], VLM_VIT, fake_ids)
    with pytest.raises(SampleRejected, match="No loss defined"):
        build_vlm_plan({"conversations": [{"from": "human", "value": "hi"}]}, [], VLM_VIT, fake_ids)
    with pytest.raises(SampleRejected, match="video"):
        build_vlm_plan({"video": "v.mp4", "conversations": []}, [], VLM_VIT, fake_ids)
    # a gpt text that tokenises to nothing is dropped -> no loss left
    with pytest.raises(SampleRejected, match="No loss"):
        build_vlm_plan(
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": " "}]}, [], VLM_VIT, fake_ids
        )


def test_latent_and_vit_sides_are_reported():
    big = ImageTransformArgs(max_image_size=2048, min_image_size=512, image_stride=16, max_pixels=10**8)
    ((_, plan),) = t2i_plan_variants('{"a": "x"}', (2048, 1024), big, fake_ids)
    assert count_tokens(plan).max_latent_side == 128
    plan = SamplePlan((PlanItem.vit((1120, 560), 14, 0),))
    assert count_tokens(plan).max_vit_side == 80
