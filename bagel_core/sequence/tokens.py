"""Token accounting: the one function that says how many tokens a sample occupies in a packed sequence.

Statistics (``bagel data stats``), the packing simulation and the packed training dataset all build
a :class:`SamplePlan` with the builders below and call :func:`count_tokens` on it, so the numbers a
user sees before launch are the numbers the packer will use (data-format.md sections 6, 7, 9.1).

A plan is an ordered list of items, exactly upstream's ``sequence_plan`` plus what each item
consumes: text ids, or the *resized* size of a ViT / VAE image. Costs per item (7.3):

* text of n ids: ``<|im_start|> ids <|im_end|>`` = n + 2 tokens; loader estimate n;
* ViT image W x H: (H/14)(W/14) patches + ``<|vision_start|>``/``<|vision_end|>`` = P + 2;
  estimate W*H // stride^2 with the YAML ``image_stride``;
* VAE image W x H: (H/16)(W/16) latent tokens + 2 markers; estimate W*H // stride^2.

The packer compares the *estimate* ``num_tokens + 2 * len(items)`` (plus, for VLM, images that were
resized but never placed) against its caps, but advances its fill counter by the *exact* count;
:class:`TokenCount` keeps both.

Counting conventions (per-visit randomness made exact and reproducible)
-------------------------------------------------------------------------
Upstream draws a few things at random each time a row is visited. Instead of sampling, the
``*_plan_variants`` builders enumerate every possible plan of a sample with its exact probability
under upstream's distribution; statistics report all of them summarised:

* **T2I**: one variant per caption value of the ``captions`` JSON object (uniform choice). ``{}``
  becomes the caption ``" "`` (upstream's fallback).
* **Edit** (N images): start ~ U{0..N-2}; end ~ U{start+1..min(start+2, N-1)}; when the span has two
  steps, concatenated vs sequential with probability 1/2 each (concatenated pulls ``end`` back by one
  when it is the last image). Each step's instruction is drawn uniformly among its alternatives;
  concatenated text is every chosen instruction followed by ``". "``, right-stripped (so a collapsed
  one-step concatenation is ``"<instruction>."``). All (span, mode, instruction) combinations are
  enumerated; identical costs are merged.
* **VLM**: deterministic (no per-visit choice) - one variant. Video records are rejected with a
  reason: their frame count is random and needs decoding (not counted here).
* **CFG dropout** (section 10) is *not* applied to the counts: they are the full plan (an upper bound
  of the real length; the estimate is unaffected by dropout). :class:`TokenCount` lists the exact
  tokens of every droppable item (``cfg_text``/``cfg_vit``/``cfg_vae``) so the packing simulation
  applies upstream's independent per-item draws to real lengths.
* **Cap check**: ``over_cap`` uses the ordinary rule ``estimate > max_num_tokens_per_sample``; the
  mandatory fill rejects ``estimate >= cap`` (one token stricter), which the simulation replays.

Per sample the statistics use the **worst-case variant** (largest packer estimate, ties by exact
total) for ``text/vit/vae/total_tokens`` and the cap check, and also report the minimum and the
probability-weighted expected total.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from typing import Any, NamedTuple

from bagel_core.config.image_args import ImageTransformArgs

#: SigLIP patch side: a ViT image of W x H pixels gives (W/14)(H/14) patches.
VIT_PATCH_SIZE = 14
#: FLUX VAE downsample (8) x latent patch (2): one latent token per 16 x 16 pixels.
VAE_DOWNSAMPLE = 16
#: Side of SigLIP's learned position table (``vit_max_num_patch_per_side``).
VIT_MAX_PATCHES_PER_SIDE = 70
#: ``max_latent_size`` released BAGEL needs (model.md section 10); side of the latent position table.
DEFAULT_MAX_LATENT_SIZE = 64
#: Upstream's ``max_num_tokens_per_sample``: a sample over it is never packed.
DEFAULT_MAX_TOKENS_PER_SAMPLE = 16_384

TEXT = "text"
VIT_IMAGE = "vit_image"
VAE_IMAGE = "vae_image"

#: Looks up the token ids of a text; the packed dataset passes ``tokenizer.encode``, statistics a
#: dict filled by one batched tokenizer call.
TextIds = Callable[[str], Sequence[int]]


class SampleRejected(ValueError):
    """The sample would be skipped (or crash a worker) upstream; ``reason`` says why, for reports."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PlanItem(NamedTuple):
    """One entry of upstream's ``sequence_plan`` with what it consumes.

    ``image_size`` is the *resized* (width, height); ``image_stride`` is the YAML stride of the
    transform that produced it (divisor of the loader's estimate); ``image_index`` is the source
    image's position in the sample (for the packed dataset to fetch pixels). A NamedTuple: plans
    are built by the hundred thousand in statistics runs, and tuples are cheap to make and hash.
    """

    kind: str
    loss: bool = False
    enable_cfg: bool = False
    text_ids: tuple[int, ...] = ()
    image_size: tuple[int, int] = (0, 0)
    image_stride: int = 0
    image_index: int = -1

    @classmethod
    def text(cls, ids: Sequence[int], loss: bool = False, enable_cfg: bool = False) -> PlanItem:
        return cls(TEXT, loss=loss, enable_cfg=enable_cfg, text_ids=tuple(ids))

    @classmethod
    def vit(cls, size: tuple[int, int], stride: int, image_index: int, enable_cfg: bool = False) -> PlanItem:
        return cls(VIT_IMAGE, enable_cfg=enable_cfg, image_size=size, image_stride=stride, image_index=image_index)

    @classmethod
    def vae(
        cls, size: tuple[int, int], stride: int, image_index: int, loss: bool = False, enable_cfg: bool = False
    ) -> PlanItem:
        return cls(
            VAE_IMAGE,
            loss=loss,
            enable_cfg=enable_cfg,
            image_size=size,
            image_stride=stride,
            image_index=image_index,
        )


@dataclass(frozen=True)
class SamplePlan:
    """A sample's ordered items, plus images resized but never placed (VLM surplus; estimate only)."""

    items: tuple[PlanItem, ...]
    unplaced_images: tuple[tuple[int, int, int], ...] = ()  # (width, height, stride)


class TokenCount(NamedTuple):
    """Exact and estimated cost of one plan.

    ``text_tokens``/``vit_tokens``/``vae_tokens`` include their wrapping tokens (``<|im_start|>``/
    ``<|im_end|>``, ``<|vision_start|>``/``<|vision_end|>``), so ``total`` = their sum = the length of
    the sample in the packed sequence. ``estimate`` is what the packer compares with its caps.
    ``cfg_text``/``cfg_vit``/``cfg_vae``: exact tokens of each placed item that CFG dropout may remove
    (``enable_cfg``), so a simulation can apply section 10's per-item draws without the plan.
    """

    text_tokens: int
    vit_tokens: int
    vae_tokens: int
    estimate: int
    num_items: int
    ce_tokens: int
    mse_tokens: int
    max_vit_side: int
    max_latent_side: int
    cfg_text: tuple[int, ...] = ()
    cfg_vit: tuple[int, ...] = ()
    cfg_vae: tuple[int, ...] = ()

    @property
    def total(self) -> int:
        return self.text_tokens + self.vit_tokens + self.vae_tokens


def count_tokens(plan: SamplePlan, dropped: Iterable[int] = ()) -> TokenCount:
    """THE token accounting of one sample (data-format.md 7.3, 9.1, 11).

    ``dropped``: indices of items removed by CFG dropout; they leave the exact count (an item that
    is not placed occupies nothing) but stay in the estimate, which upstream computes before
    dropout. CE positions of a loss text of n ids are n + 1 (``<|im_start|>`` .. last id); MSE
    positions are the latent tokens of noised VAE images.
    """
    dropped_set = set(dropped)
    text = vit = vae = ce = mse = 0
    max_vit_side = max_latent_side = 0
    cfg_text: list[int] = []
    cfg_vit: list[int] = []
    cfg_vae: list[int] = []
    estimate = 2 * len(plan.items)
    for index, item in enumerate(plan.items):
        placed = index not in dropped_set
        if item.kind == TEXT:
            n = len(item.text_ids)
            estimate += n
            if placed:
                text += n + 2
                ce += (n + 1) if item.loss else 0
                if item.enable_cfg:
                    cfg_text.append(n + 2)
            continue
        width, height = item.image_size
        estimate += width * height // (item.image_stride * item.image_stride)
        if item.kind == VIT_IMAGE:
            cols, rows = width // VIT_PATCH_SIZE, height // VIT_PATCH_SIZE
            max_vit_side = max(max_vit_side, cols, rows)
            if placed:
                vit += rows * cols + 2
                if item.enable_cfg:
                    cfg_vit.append(rows * cols + 2)
        elif item.kind == VAE_IMAGE:
            cols, rows = width // VAE_DOWNSAMPLE, height // VAE_DOWNSAMPLE
            max_latent_side = max(max_latent_side, cols, rows)
            if placed:
                vae += rows * cols + 2
                mse += rows * cols if item.loss else 0
                if item.enable_cfg:
                    cfg_vae.append(rows * cols + 2)
        else:
            raise ValueError(f"unknown plan item kind {item.kind!r}")
    for width, height, stride in plan.unplaced_images:
        estimate += width * height // (stride * stride)
    return TokenCount(
        text_tokens=text,
        vit_tokens=vit,
        vae_tokens=vae,
        estimate=estimate,
        num_items=len(plan.items),
        ce_tokens=ce,
        mse_tokens=mse,
        max_vit_side=max_vit_side,
        max_latent_side=max_latent_side,
        cfg_text=tuple(cfg_text),
        cfg_vit=tuple(cfg_vit),
        cfg_vae=tuple(cfg_vae),
    )


@lru_cache(maxsize=1 << 16)
def resized(args: ImageTransformArgs, width: int, height: int, img_num: int = 1) -> tuple[int, int]:
    """``args.resized_size`` memoised: real datasets repeat a few image sizes over and over."""
    return args.resized_size(width, height, img_num)


def check_strides(vae_args: ImageTransformArgs | None, vit_args: ImageTransformArgs | None, where: str) -> None:
    """Resized sides must be whole patches / latent tokens, or upstream's patchify crashes."""
    if vae_args is not None and vae_args.image_stride % VAE_DOWNSAMPLE:
        raise ValueError(
            f"{where}: VAE image_stride {vae_args.image_stride} is not a multiple of {VAE_DOWNSAMPLE}; "
            "images would not split into whole latent tokens. Use image_stride: 16"
        )
    if vit_args is not None and vit_args.image_stride % VIT_PATCH_SIZE:
        raise ValueError(
            f"{where}: ViT image_stride {vit_args.image_stride} is not a multiple of {VIT_PATCH_SIZE}; "
            "images would not split into whole ViT patches. Use image_stride: 14"
        )


# ---- T2I ------------------------------------------------------------------------------------------
def t2i_caption_texts(captions: Any) -> list[str]:
    """Caption alternatives of a T2I row's ``captions`` cell (JSON object text), in key order.

    ``{}`` gives ``[" "]`` (upstream encodes a single space). Anything but an object of strings is
    rejected: upstream either skips the row (invalid JSON) or kills the worker (not an object).
    """
    if isinstance(captions, (bytes, bytearray)):
        captions = captions.decode("utf-8", errors="replace")
    if not isinstance(captions, str):
        raise SampleRejected(f"captions is {type(captions).__name__}, expected JSON object text")
    try:
        parsed = json.loads(captions)
    except json.JSONDecodeError as exc:
        raise SampleRejected(f"captions is not valid JSON ({exc.msg}); upstream skips the row") from exc
    if not isinstance(parsed, dict):
        raise SampleRejected(
            f"captions is a JSON {type(parsed).__name__}, not an object; upstream's worker would crash"
        )
    values = list(parsed.values())
    if not all(isinstance(v, str) for v in values):
        raise SampleRejected("captions has a non-string value; upstream's tokenizer call would fail")
    return values or [" "]


def build_t2i_plan(caption_ids: Sequence[int], image_size: tuple[int, int], vae_args: ImageTransformArgs) -> SamplePlan:
    """T2I: caption (cfg) then the target as a noised VAE image (loss)."""
    size = resized(vae_args, image_size[0], image_size[1])
    return SamplePlan(
        (
            PlanItem.text(caption_ids, loss=False, enable_cfg=True),
            PlanItem.vae(size, vae_args.image_stride, 0, loss=True, enable_cfg=False),
        )
    )


def t2i_plan_variants(
    captions: Any, image_size: tuple[int, int], vae_args: ImageTransformArgs, ids_of: TextIds
) -> list[tuple[float, SamplePlan]]:
    """Every plan of a T2I row with its probability (one per caption value)."""
    texts = t2i_caption_texts(captions)
    p = 1.0 / len(texts)
    return [(p, build_t2i_plan(ids_of(text), image_size, vae_args)) for text in texts]


def sample_t2i_plan(
    captions: Any, image_size: tuple[int, int], vae_args: ImageTransformArgs, ids_of: TextIds, rng: random.Random
) -> SamplePlan:
    """One visit's plan: caption drawn like upstream (``random.choice`` over all values)."""
    texts = t2i_caption_texts(captions)
    return build_t2i_plan(ids_of(rng.choice(texts)), image_size, vae_args)


# ---- editing --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EditSpan:
    """Upstream's random span of an edit row after its mode decision (end already pulled back)."""

    start: int
    end: int
    concatenated: bool


def _instruction_alternatives(instruction_list: Sequence[Any], num_images: int) -> list[list[str]]:
    if len(instruction_list) != num_images - 1:
        raise SampleRejected(
            f"instruction_list has {len(instruction_list)} entries for {num_images} images "
            f"(needs {num_images - 1}); upstream skips the row"
        )
    if num_images < 2:
        raise SampleRejected(f"an edit row needs at least 2 images, got {num_images}")
    out: list[list[str]] = []
    for k, entry in enumerate(instruction_list):
        # A bare string makes upstream's random.choice pick one character: reproduced on purpose.
        alternatives = list(entry) if isinstance(entry, str) else list(entry if entry is not None else [])
        if not alternatives or not all(isinstance(a, str) for a in alternatives):
            raise SampleRejected(f"instruction_list[{k}] has no string alternatives; upstream skips the row")
        out.append(alternatives)
    return out


@lru_cache(maxsize=64)
def edit_span_distribution(num_images: int) -> tuple[tuple[Fraction, EditSpan], ...]:
    """Exact distribution of (start, end, mode) under upstream's ``parse_row`` draws."""
    spans: dict[EditSpan, Fraction] = {}
    p_start = Fraction(1, num_images - 1)
    for start in range(num_images - 1):
        ends = range(start + 1, min(start + 3, num_images))
        p_end = p_start / len(ends)
        for end in ends:
            if end - start > 1:
                concat_end = end - 1 if end == num_images - 1 else end
                for span, p in (
                    (EditSpan(start, concat_end, True), p_end / 2),
                    (EditSpan(start, end, False), p_end / 2),
                ):
                    spans[span] = spans.get(span, Fraction(0)) + p
            else:
                span = EditSpan(start, end, False)
                spans[span] = spans.get(span, Fraction(0)) + p_end
    ordered = sorted(spans, key=lambda s: (s.start, s.end, s.concatenated))
    return tuple((spans[span], span) for span in ordered)


def concatenated_instruction(choices: Sequence[str]) -> str:
    """Concatenated-mode text: each instruction followed by ``". "``, then right-stripped."""
    return "".join(choice + ". " for choice in choices).rstrip()


def edit_image_sizes(
    image_sizes: Sequence[tuple[int, int]], vae_args: ImageTransformArgs, vit_args: ImageTransformArgs
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Resized VAE and ViT sizes of every image of an edit row (each image on its own: ``img_num`` 1)."""
    return ([resized(vae_args, w, h) for w, h in image_sizes], [resized(vit_args, w, h) for w, h in image_sizes])


def build_edit_plan(
    image_sizes: Sequence[tuple[int, int]],
    span: EditSpan,
    instructions: Sequence[Sequence[int]],
    vae_args: ImageTransformArgs,
    vit_args: ImageTransformArgs,
    resized_sizes: tuple[list[tuple[int, int]], list[tuple[int, int]]] | None = None,
) -> SamplePlan:
    """Edit plan for a span; ``instructions``: ids of each text item in order (1 if concatenated).

    Source: clean VAE (cfg) + ViT (cfg). Sequential: per step its instruction (cfg), intermediate
    images as noised VAE (loss) + clean VAE (cfg) + ViT (cfg), the last as noised VAE only.
    Concatenated: one instruction, then the target as noised VAE only. ``resized_sizes``: the
    output of :func:`edit_image_sizes` when the caller builds many plans of one row.
    """
    vae_sizes, vit_sizes = resized_sizes or edit_image_sizes(image_sizes, vae_args, vit_args)
    vae_stride, vit_stride = vae_args.image_stride, vit_args.image_stride
    start, end = span.start, span.end
    items = [
        PlanItem.vae(vae_sizes[start], vae_stride, start, loss=False, enable_cfg=True),
        PlanItem.vit(vit_sizes[start], vit_stride, start, enable_cfg=True),
    ]
    if span.concatenated:
        items.append(PlanItem.text(instructions[0], loss=False, enable_cfg=True))
        items.append(PlanItem.vae(vae_sizes[end], vae_stride, end, loss=True, enable_cfg=False))
        return SamplePlan(tuple(items))
    for step, idx in enumerate(range(start + 1, end + 1)):
        items.append(PlanItem.text(instructions[step], loss=False, enable_cfg=True))
        items.append(PlanItem.vae(vae_sizes[idx], vae_stride, idx, loss=True, enable_cfg=False))
        if idx != end:
            items.append(PlanItem.vae(vae_sizes[idx], vae_stride, idx, loss=False, enable_cfg=True))
            items.append(PlanItem.vit(vit_sizes[idx], vit_stride, idx, enable_cfg=True))
    return SamplePlan(tuple(items))


def _edit_texts(span: EditSpan, chosen: Sequence[str]) -> list[str]:
    return [concatenated_instruction(chosen)] if span.concatenated else list(chosen)


def edit_plan_variants(
    instruction_list: Sequence[Any],
    image_sizes: Sequence[tuple[int, int]],
    vae_args: ImageTransformArgs,
    vit_args: ImageTransformArgs,
    ids_of: TextIds,
) -> list[tuple[float, SamplePlan]]:
    """Every plan of an edit row with its probability (span x mode x instruction choices)."""
    alternatives = _instruction_alternatives(instruction_list, len(image_sizes))
    sizes = edit_image_sizes(image_sizes, vae_args, vit_args)
    variants: list[tuple[float, SamplePlan]] = []
    for p_span, span in edit_span_distribution(len(image_sizes)):
        steps = [alternatives[idx - 1] for idx in range(span.start + 1, span.end + 1)]
        combos: list[list[str]] = [[]]
        for options in steps:
            combos = [combo + [option] for combo in combos for option in options]
        p_combo = float(p_span) / len(combos)
        for combo in combos:
            ids = [ids_of(text) for text in _edit_texts(span, combo)]
            variants.append((p_combo, build_edit_plan(image_sizes, span, ids, vae_args, vit_args, sizes)))
    return variants


def sample_edit_plan(
    instruction_list: Sequence[Any],
    image_sizes: Sequence[tuple[int, int]],
    vae_args: ImageTransformArgs,
    vit_args: ImageTransformArgs,
    ids_of: TextIds,
    rng: random.Random,
) -> SamplePlan:
    """One visit's plan, drawing exactly in upstream's order (start, end, mode, instructions)."""
    n = len(image_sizes)
    alternatives = _instruction_alternatives(instruction_list, n)
    start = rng.choice(range(n - 1))
    end = rng.choice(range(start + 1, min(start + 3, n)))
    concatenated = end - start > 1 and rng.random() < 0.5
    if concatenated and end == n - 1:
        end -= 1
    span = EditSpan(start, end, concatenated)
    chosen = [rng.choice(alternatives[idx - 1]) for idx in range(start + 1, end + 1)]
    ids = [ids_of(text) for text in _edit_texts(span, chosen)]
    return build_edit_plan(image_sizes, span, ids, vae_args, vit_args)


# ---- VLM ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VlmElement:
    """One element of upstream's ``change_format`` output."""

    kind: str  # TEXT or VIT_IMAGE
    text: str = ""
    loss: bool = False


def vlm_elements(conversations: Any, num_images: int) -> list[VlmElement]:
    """Upstream's ``change_format``: conversation turns -> text / image elements (section 4.3).

    ``<image>`` splits a human turn; an image element follows piece ``idx`` when it is not the last
    piece and ``idx < num_images`` (counted per turn, as upstream does). Roles other than
    ``human``/``gpt`` are ignored.
    """
    if not isinstance(conversations, list):
        raise SampleRejected("'conversations' is missing or not a list")
    elements: list[VlmElement] = []
    for turn_no, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise SampleRejected(f"conversations[{turn_no}] is not an object with a string 'value'")
        role, value = turn.get("from"), turn["value"]
        if role == "human":
            if "<image>" not in value:
                elements.append(VlmElement(TEXT, value, False))
                continue
            pieces = value.split("<image>")
            for idx, piece in enumerate(pieces):
                if piece.strip() != "":
                    elements.append(VlmElement(TEXT, piece.strip(), False))
                if idx != len(pieces) - 1 and idx < num_images:
                    elements.append(VlmElement(VIT_IMAGE))
        elif role == "gpt":
            elements.append(VlmElement(TEXT, value, True))
    return elements


def vlm_image_names(record: dict[str, Any]) -> list[str]:
    """The record's image paths in order ([] for text-only); video records are rejected."""
    if "image" in record and record["image"] is not None:
        image = record["image"]
        names = image if isinstance(image, list) else [image]
        if not all(isinstance(n, str) for n in names):
            raise SampleRejected("'image' must be a path string or a list of path strings")
        return list(names)
    if "video" in record:
        raise SampleRejected("video record: the frame count is drawn at random and needs decoding; not counted")
    return []


def build_vlm_plan(
    record: dict[str, Any], image_sizes: Sequence[tuple[int, int]], vit_args: ImageTransformArgs, ids_of: TextIds
) -> SamplePlan:
    """VLM plan: conversation order, ViT images (no cfg), ``gpt`` text with loss.

    All images are resized with ``img_num`` = their count (pixel budget split); images beyond the
    placed ``<image>`` slots are only in the estimate. Texts tokenising to nothing are dropped; no
    loss-bearing text, or more image slots than images, rejects the record.
    """
    names = vlm_image_names(record)
    if len(names) != len(image_sizes):
        raise SampleRejected(f"record lists {len(names)} images but {len(image_sizes)} sizes are known")
    img_num = len(image_sizes)
    sizes = [resized(vit_args, w, h, img_num) for w, h in image_sizes]
    stride = vit_args.image_stride
    items: list[PlanItem] = []
    next_image = 0
    for element in vlm_elements(record.get("conversations"), img_num):
        if element.kind == TEXT:
            ids = ids_of(element.text)
            if len(ids) > 0:
                items.append(PlanItem.text(ids, loss=element.loss, enable_cfg=False))
            continue
        if next_image >= img_num:
            raise SampleRejected(
                f"the conversation places more than {img_num} image(s) (one <image> per turn counts per turn "
                "upstream); the packer would run out of images and crash"
            )
        items.append(PlanItem.vit(sizes[next_image], stride, next_image, enable_cfg=False))
        next_image += 1
    if not any(item.loss for item in items):
        raise SampleRejected("no loss-bearing (gpt) text; upstream prints 'No loss defined, skipped.'")
    unplaced = tuple((w, h, stride) for (w, h) in sizes[next_image:])
    return SamplePlan(tuple(items), unplaced)


# ---- variants summarised ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleCost:
    """All distinct costs of a sample with their probabilities, and the conventions derived from them."""

    probs: tuple[float, ...]
    counts: tuple[TokenCount, ...]
    worst: TokenCount = field(init=False)

    def __post_init__(self) -> None:
        worst = max(self.counts, key=lambda c: (c.estimate, c.total))
        object.__setattr__(self, "worst", worst)

    @property
    def total_min(self) -> int:
        return min(c.total for c in self.counts)

    @property
    def estimate_min(self) -> int:
        return min(c.estimate for c in self.counts)

    @property
    def total_mean(self) -> float:
        return sum(p * c.total for p, c in zip(self.probs, self.counts))

    @property
    def estimate_mean(self) -> float:
        return sum(p * c.estimate for p, c in zip(self.probs, self.counts))


def summarise_variants(variants: Sequence[tuple[float, SamplePlan]]) -> SampleCost:
    """Count every variant and merge identical costs (summing their probabilities)."""
    merged: dict[TokenCount, float] = {}
    for p, plan in variants:
        count = count_tokens(plan)
        merged[count] = merged.get(count, 0.0) + float(p)
    ordered = sorted(merged.items(), key=lambda kv: (kv[0].estimate, kv[0].total))
    return SampleCost(tuple(float(p) for _, p in ordered), tuple(c for c, _ in ordered))
