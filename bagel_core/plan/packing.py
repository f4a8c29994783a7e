"""The packer's decision logic (data-format.md 8) and a token-count-only simulation of it.

:func:`pack_events` is upstream's ``PackedDataset.__iter__`` loop with everything but the decisions
abstracted away: where samples come from (``next_sample(group)``), what a sample's estimate is, and
what packing it does (``pack(sample)`` returns the real tokens it added). It yields one event per
decision, so the packed training dataset can reuse it (build tensors on :class:`Packed`, emit the
batch on :class:`Flush`) and the simulation can count without decoding a single image.

Exactly as upstream (8.2): mandatory fill when the pack is empty (accept only ``est < cap``,
strict, no ``max_num_tokens`` check); the buffer's oldest sample is preferred while
``curr < prefer_buffer_before``; otherwise a group is drawn with ``u < cumprob`` (first match);
``est > cap`` (strict) skips; ``curr + est > max_num_tokens`` buffers a fresh sample while the
buffer has room, otherwise yields the pack and **discards the sample in hand**; after packing,
``curr >= expected_num_tokens`` yields. ``curr`` counts real tokens, the caps compare estimates.
"""

from __future__ import annotations

import bisect
import random
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from bagel_core.config.errors import DataError
from bagel_core.sequence.tokens import DEFAULT_MAX_TOKENS_PER_SAMPLE

S = TypeVar("S")


@dataclass(frozen=True)
class PackingParams:
    """The packer's knobs, with upstream's defaults (8.1). The fine-tune recipe uses 10240/11520/10240."""

    expected_num_tokens: int = 32_768
    max_num_tokens: int = 36_864
    max_num_tokens_per_sample: int = DEFAULT_MAX_TOKENS_PER_SAMPLE
    prefer_buffer_before: int = 16_384
    max_buffer_size: int = 50

    def __post_init__(self) -> None:
        for name in ("expected_num_tokens", "max_num_tokens", "max_num_tokens_per_sample"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_buffer_size < 0 or self.prefer_buffer_before < 0:
            raise ValueError("max_buffer_size and prefer_buffer_before must be >= 0")


# ---- events --------------------------------------------------------------------------------------
@dataclass
class Packed(Generic[S]):
    sample: S
    group: int
    estimate: int
    tokens: int
    mandatory: bool
    from_buffer: bool = False


@dataclass
class Skipped(Generic[S]):
    """``skip a sample with length ...``: over the per-sample cap (mandatory fill uses ``>=``)."""

    sample: S
    group: int
    estimate: int
    mandatory: bool


@dataclass
class Buffered(Generic[S]):
    sample: S
    group: int
    estimate: int


@dataclass
class Flush(Generic[S]):
    """A pack is yielded. ``overflow``: forced by a sample that did not fit (it is ``discarded``)."""

    length: int
    num_samples: int
    overflow: bool
    discarded: S | None = None
    discarded_group: int = -1
    discarded_from_buffer: bool = False


def cumulative_probs(weights: Sequence[float]) -> list[float]:
    """``c_i = (w_1 + ... + w_i) / sum(w)`` in YAML order."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("the sum of group weights must be > 0")
    out, running = [], 0.0
    for w in weights:
        running += w
        out.append(running / total)
    return out


def choose_group(u: float, cumprobs: Sequence[float]) -> int:
    """First group with ``u < c_i`` (group 0 when none, as upstream's default)."""
    for i, c in enumerate(cumprobs):
        if u < c:
            return i
    return 0


def pack_events(
    params: PackingParams,
    weights: Sequence[float],
    mandatory: Sequence[bool],
    next_sample: Callable[[int], S],
    estimate: Callable[[S], int],
    pack: Callable[[S], int],
    rng: random.Random,
    buffer: deque[tuple[S, int]] | None = None,
) -> Iterator[Packed[S] | Skipped[S] | Buffered[S] | Flush[S]]:
    """Upstream's packing loop as an infinite stream of decisions (see module docstring).

    ``buffer``: the overflow buffer, ``(sample, group)`` pairs oldest first; pass your own deque to
    see it and to start with restored contents (the packed dataset's exact resume); default empty.
    """
    cumprobs = cumulative_probs(weights)
    buffer = deque() if buffer is None else buffer
    curr = 0
    count = 0
    while True:
        if curr == 0:
            for g, is_mandatory in enumerate(mandatory):
                if not is_mandatory:
                    continue
                while True:
                    sample = next_sample(g)
                    est = estimate(sample)
                    if est < params.max_num_tokens_per_sample:
                        added = pack(sample)
                        curr += added
                        count += 1
                        yield Packed(sample, g, est, added, True)
                        break
                    yield Skipped(sample, g, est, True)
        if curr < params.prefer_buffer_before and buffer:
            sample, g = buffer.popleft()
            from_buffer = True
        else:
            g = choose_group(rng.random(), cumprobs)
            sample = next_sample(g)
            from_buffer = False
        est = estimate(sample)
        if est > params.max_num_tokens_per_sample:
            yield Skipped(sample, g, est, False)
            continue
        if curr + est > params.max_num_tokens:
            if len(buffer) < params.max_buffer_size and not from_buffer:
                buffer.append((sample, g))
                yield Buffered(sample, g, est)
            else:
                yield Flush(curr, count, True, sample, g, from_buffer)
                curr, count = 0, 0
            continue
        added = pack(sample)
        curr += added
        count += 1
        yield Packed(sample, g, est, added, False, from_buffer)
        if curr >= params.expected_num_tokens:
            yield Flush(curr, count, False)
            curr, count = 0, 0


# ---- simulation over token counts -------------------------------------------------------------------
@dataclass(frozen=True)
class CfgDropout:
    """Per-item CFG drop probabilities (section 10). Defaults: the model arguments used with
    ``visual_gen`` (text 0.1, ViT 0.3, VAE 0.3); ``CfgDropout(0, 0, 0)`` disables dropout."""

    text: float = 0.1
    vit: float = 0.3
    vae: float = 0.3


NO_DROPOUT = CfgDropout(0.0, 0.0, 0.0)


@dataclass(frozen=True)
class SimSample:
    """A sample as the simulation sees it: its cost variants (probabilities, estimates, exact totals).

    ``cfg``: per variant, the exact tokens of its droppable (``enable_cfg``) text, ViT and VAE items.
    """

    dataset: str
    key: tuple
    cum_probs: tuple[float, ...]
    estimates: tuple[int, ...]
    totals: tuple[int, ...]
    cfg: tuple[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...] = ()


#: Placeholder sample of groups the packer never draws from (weight 0, not mandatory).
_NEVER_READ = SimSample("", (), (1.0,), (0,), (0,))


@dataclass
class _Draw:
    sample: SimSample
    variant: int

    @property
    def estimate(self) -> int:
        return self.sample.estimates[self.variant]

    @property
    def total(self) -> int:
        return self.sample.totals[self.variant]

    def real_tokens(self, rng: random.Random, dropout: CfgDropout) -> int:
        """Exact tokens placed after independent CFG draws per droppable item (real ``curr`` increment)."""
        total = self.total
        if not self.sample.cfg or dropout == NO_DROPOUT:
            return total
        texts, vits, vaes = self.sample.cfg[self.variant]
        for items, p in ((texts, dropout.text), (vits, dropout.vit), (vaes, dropout.vae)):
            for tokens in items:
                if rng.random() < p:
                    total -= tokens
        return total


class _CyclingStream:
    """A worker's group iterator: its samples in order, forever, counting completed passes."""

    def __init__(self, name: str, samples: Sequence[SimSample], rng: random.Random) -> None:
        if not samples:
            raise DataError(
                f"{name}: this worker has no samples for this group; upstream's loader would loop forever "
                "printing '<group> repeat in rank-r worker-w' and the packer would hang"
            )
        self.samples, self.rng = samples, rng
        self.pos = 0
        self.passes = 0

    def next(self) -> _Draw:
        sample = self.samples[self.pos]
        self.pos += 1
        if self.pos == len(self.samples):
            self.pos = 0
            self.passes += 1
        variant = 0
        if len(sample.cum_probs) > 1:
            variant = min(bisect.bisect_right(sample.cum_probs, self.rng.random()), len(sample.cum_probs) - 1)
        return _Draw(sample, variant)


@dataclass
class WorkerSimulation:
    """What one (rank, worker) packer produced until each of its groups had been read once."""

    rank: int
    worker: int
    pack_lengths: list[int] = field(default_factory=list)
    overflow_flushes: int = 0
    packed_samples: int = 0
    skipped_cap: int = 0
    skipped_cap_mandatory: int = 0
    discarded_overflow: int = 0
    buffered: int = 0
    max_buffer: int = 0
    tokens_by_group: dict[str, int] = field(default_factory=dict)
    tokens_by_dataset: dict[str, int] = field(default_factory=dict)
    samples_by_group: dict[str, int] = field(default_factory=dict)
    first_pass_pack: dict[str, int] = field(default_factory=dict)
    truncated: bool = False


def simulate_worker(
    params: PackingParams,
    groups: Sequence[str],
    weights: Sequence[float],
    mandatory: Sequence[bool],
    samples_by_group: Sequence[Sequence[SimSample]],
    seed: int,
    rank: int = 0,
    worker: int = 0,
    max_packs: int = 100_000,
    dropout: CfgDropout = NO_DROPOUT,
) -> WorkerSimulation:
    """Run :func:`pack_events` over token counts until every read group finished one pass (an epoch).

    Variants (caption choice, edit span) are drawn per visit with a ``random.Random`` derived from
    ``seed``, rank and worker, so the result is deterministic. CFG dropout (``dropout``) removes
    droppable items from the real length only, as in ``pack_sequence``; estimates are unchanged.
    Stops after ``max_packs`` packs (``truncated``).
    """
    rng = random.Random(f"{seed}-{rank}-{worker}")
    # A group with weight 0 that is not mandatory is never read: it neither needs data nor ends epochs.
    read = [w > 0 or m for w, m in zip(weights, mandatory)]
    streams = [
        _CyclingStream(f"{g} rank-{rank} worker-{worker}", s if r else [_NEVER_READ], rng)
        for g, s, r in zip(groups, samples_by_group, read)
    ]
    required = {g for g, r in zip(groups, read) if r}
    result = WorkerSimulation(rank, worker)
    buffer_size = 0
    for event in pack_events(
        params,
        weights,
        mandatory,
        lambda g: streams[g].next(),
        lambda d: d.estimate,
        lambda d: d.real_tokens(rng, dropout),
        rng,
    ):
        if isinstance(event, Packed):
            name = groups[event.group]
            result.packed_samples += 1
            result.tokens_by_group[name] = result.tokens_by_group.get(name, 0) + event.tokens
            result.samples_by_group[name] = result.samples_by_group.get(name, 0) + 1
            ds = event.sample.sample.dataset
            result.tokens_by_dataset[ds] = result.tokens_by_dataset.get(ds, 0) + event.tokens
            buffer_size -= int(event.from_buffer)
        elif isinstance(event, Skipped):
            result.skipped_cap += 1
            result.skipped_cap_mandatory += int(event.mandatory)
        elif isinstance(event, Buffered):
            result.buffered += 1
            buffer_size += 1
            result.max_buffer = max(result.max_buffer, buffer_size)
        elif isinstance(event, Flush):
            result.pack_lengths.append(event.length)
            if event.overflow:
                result.overflow_flushes += 1
                result.discarded_overflow += int(event.discarded is not None)
                buffer_size -= int(event.discarded_from_buffer)
            for name, stream in zip(groups, streams):
                if stream.passes >= 1 and name not in result.first_pass_pack:
                    result.first_pass_pack[name] = len(result.pack_lengths)
            if required <= set(result.first_pass_pack):
                break
            if len(result.pack_lengths) >= max_packs:
                result.truncated = True
                break
    return result


def flex_padding(length: int, params: PackingParams) -> int:
    """Flex-attention padding of a pack (8.3): ``max_num_tokens - length`` (negative = over the cap)."""
    return params.max_num_tokens - length
