"""The packer's decision logic (data-format.md 8) and a token-count-only simulation of it.

:func:`pack_events` is upstream's ``PackedDataset.__iter__`` loop with everything but the decisions
abstracted away: where samples come from (``next_sample(group)``), what a sample's estimate is, and
what packing it does (``pack(sample)`` returns the real tokens it added). It yields one event per
decision, so the packed training dataset can reuse it (build tensors on :class:`Packed`, emit the
batch on :class:`Flush`) and the simulation can count without decoding a single image.

Two modes (:attr:`PackingParams.mode`):

* ``upstream``, exactly as upstream (8.2): mandatory fill when the pack is empty (accept only
  ``est < cap``, strict, no ``max_num_tokens`` check); the buffer's oldest sample is preferred while
  ``curr < prefer_buffer_before``; otherwise a group is drawn with ``u < cumprob`` (first match);
  ``est > cap`` (strict) skips; ``curr + est > max_num_tokens`` buffers a fresh sample while the
  buffer has room, otherwise yields the pack and **discards the sample in hand**; after packing,
  ``curr >= expected_num_tokens`` yields. ``curr`` counts real tokens, the caps compare estimates.
* ``carry`` (the default): the same loop, but no sample read is thrown away. Where upstream discards
  the overflowing sample, the pack is yielded and the sample goes to the *front* of the buffer
  (:class:`Flush` ``carried``); the first pick after a pack's mandatory fill is always the buffer's
  oldest sample, so the carried sample opens the next pack, beside that pack's mandatory samples.
  A sample that does not fit beside the mandatory samples alone can fit no pack this loop makes:
  it is skipped (:class:`Unfit`) instead of being carried forever. Why: with the fine-tune recipe
  (``prefer_buffer_before`` > ``max_num_tokens``) upstream loses the sample behind every overflow
  flush, large samples (editing) far more often than small ones, which skews the trained mixture.

The caller owns the buffer (a deque of ``(sample, group)``); at every :class:`Flush` it and the RNG
are the packer's whole state, which is what makes exact resume possible in both modes.
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

#: The packing modes (module docstring): ``carry`` wastes no sample read, ``upstream`` replicates upstream.
CARRY = "carry"
UPSTREAM = "upstream"
PACKING_MODES = (CARRY, UPSTREAM)


@dataclass(frozen=True)
class PackingParams:
    """The packer's knobs, with upstream's defaults (8.1). The fine-tune recipe uses 10240/11520/10240."""

    expected_num_tokens: int = 32_768
    max_num_tokens: int = 36_864
    max_num_tokens_per_sample: int = DEFAULT_MAX_TOKENS_PER_SAMPLE
    prefer_buffer_before: int = 16_384
    max_buffer_size: int = 50
    mode: str = CARRY

    def __post_init__(self) -> None:
        for name in ("expected_num_tokens", "max_num_tokens", "max_num_tokens_per_sample"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_buffer_size < 0 or self.prefer_buffer_before < 0:
            raise ValueError("max_buffer_size and prefer_buffer_before must be >= 0")
        if self.mode not in PACKING_MODES:
            raise ValueError(f"packing mode {self.mode!r} is unknown: use one of {', '.join(PACKING_MODES)}")


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
class Unfit(Generic[S]):
    """``carry`` only: the sample does not fit beside the pack's mandatory samples (``length`` tokens),
    the emptiest pack the loop makes, so carrying it could never place it: skipped."""

    sample: S
    group: int
    estimate: int
    length: int
    from_buffer: bool


@dataclass
class Flush(Generic[S]):
    """A pack is yielded. ``overflow``: forced by a sample that did not fit; ``upstream`` throws it away
    (``discarded``), ``carry`` puts it at the front of the buffer to open the next pack (``carried``)."""

    length: int
    num_samples: int
    overflow: bool
    discarded: S | None = None
    discarded_group: int = -1
    discarded_from_buffer: bool = False
    carried: S | None = None
    carried_group: int = -1
    carried_from_buffer: bool = False


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
) -> Iterator[Packed[S] | Skipped[S] | Buffered[S] | Unfit[S] | Flush[S]]:
    """The packing loop of ``params.mode`` as an infinite stream of decisions (see module docstring).

    ``buffer``: the overflow buffer, ``(sample, group)`` pairs oldest first; pass your own deque to
    see it and to start with restored contents (the packed dataset's exact resume); default empty.
    """
    cumprobs = cumulative_probs(weights)
    buffer = deque() if buffer is None else buffer
    carry = params.mode == CARRY
    curr = 0
    count = 0
    opened = False  # a sample beyond the mandatory fill is in the pack
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
        if buffer and (curr < params.prefer_buffer_before or (carry and not opened)):
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
            if carry and not opened:
                yield Unfit(sample, g, est, curr, from_buffer)
            elif len(buffer) < params.max_buffer_size and not from_buffer:
                buffer.append((sample, g))
                yield Buffered(sample, g, est)
            elif carry:
                buffer.appendleft((sample, g))
                yield Flush(curr, count, True, carried=sample, carried_group=g, carried_from_buffer=from_buffer)
                curr, count, opened = 0, 0, False
            else:
                yield Flush(curr, count, True, sample, g, from_buffer)
                curr, count, opened = 0, 0, False
            continue
        added = pack(sample)
        curr += added
        count += 1
        opened = True
        yield Packed(sample, g, est, added, False, from_buffer)
        if curr >= params.expected_num_tokens:
            yield Flush(curr, count, False)
            curr, count, opened = 0, 0, False


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


#: What became of the samples a simulated worker drew, per group. Terminal fates (every drawn sample
#: ends in exactly one): packed (trained on), skipped_over_cap, discarded_on_flush (``upstream``),
#: unfit (``carry``) and pending (still in the buffer when the simulation stopped). ``buffered`` and
#: ``carried`` count passages through the buffer, not fates.
TERMINAL_FATES = ("packed", "skipped_over_cap", "discarded_on_flush", "unfit", "pending")
FATES = ("drawn", *TERMINAL_FATES, "buffered", "carried")


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
    carried: int = 0
    unfit: int = 0
    tokens_by_group: dict[str, int] = field(default_factory=dict)
    tokens_by_dataset: dict[str, int] = field(default_factory=dict)
    samples_by_group: dict[str, int] = field(default_factory=dict)
    fates_by_group: dict[str, dict[str, int]] = field(default_factory=dict)
    first_pass_pack: dict[str, int] = field(default_factory=dict)
    truncated: bool = False
    stalled: bool = False

    def fate(self, group: str, what: str, n: int = 1) -> None:
        fates = self.fates_by_group.setdefault(group, dict.fromkeys(FATES, 0))
        fates[what] += n

    def record(self, event: Packed | Skipped | Buffered | Unfit | Flush, groups: Sequence[str]) -> None:
        """Count one packer decision (pack lengths and epochs are the caller's)."""
        if isinstance(event, Packed):
            name = groups[event.group]
            self.packed_samples += 1
            self.tokens_by_group[name] = self.tokens_by_group.get(name, 0) + event.tokens
            self.samples_by_group[name] = self.samples_by_group.get(name, 0) + 1
            ds = event.sample.sample.dataset
            self.tokens_by_dataset[ds] = self.tokens_by_dataset.get(ds, 0) + event.tokens
            self.fate(name, "packed")
        elif isinstance(event, Skipped):
            self.skipped_cap += 1
            self.skipped_cap_mandatory += int(event.mandatory)
            self.fate(groups[event.group], "skipped_over_cap")
        elif isinstance(event, Buffered):
            self.buffered += 1
            self.fate(groups[event.group], "buffered")
        elif isinstance(event, Unfit):
            self.unfit += 1
            self.fate(groups[event.group], "unfit")
        elif event.overflow:
            self.overflow_flushes += 1
            if event.discarded is not None:
                self.discarded_overflow += 1
                self.fate(groups[event.discarded_group], "discarded_on_flush")
            if event.carried is not None:
                self.carried += 1
                self.fate(groups[event.carried_group], "carried")


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
    Stops after ``max_packs`` packs (``truncated``), or (``stalled`` too) after three times as many
    decisions in a row as the worker has samples without packing one (nothing fits: the loader would
    give up as well). Every sample drawn is counted in ``fates_by_group``.
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
    for name in required:
        result.fate(name, "drawn", 0)

    def draw(g: int) -> _Draw:
        result.fate(groups[g], "drawn")
        return streams[g].next()

    buffer: deque[tuple[_Draw, int]] = deque()
    patience = 3 * sum(len(s) for s, r in zip(samples_by_group, read) if r)
    idle = 0
    for event in pack_events(
        params,
        weights,
        mandatory,
        draw,
        lambda d: d.estimate,
        lambda d: d.real_tokens(rng, dropout),
        rng,
        buffer=buffer,
    ):
        result.record(event, groups)
        result.max_buffer = max(result.max_buffer, len(buffer))
        idle = 0 if isinstance(event, Packed) else idle + 1
        if idle > patience:
            result.truncated = result.stalled = True
            break
        if not isinstance(event, Flush):
            continue
        result.pack_lengths.append(event.length)
        for name, stream in zip(groups, streams):
            if stream.passes >= 1 and name not in result.first_pass_pack:
                result.first_pass_pack[name] = len(result.pack_lengths)
        if required <= set(result.first_pass_pack):
            break
        if len(result.pack_lengths) >= max_packs:
            result.truncated = True
            break
    for _, g in buffer:
        result.fate(groups[g], "pending")
    return result


def flex_padding(length: int, params: PackingParams) -> int:
    """Flex-attention padding of a pack (8.3): ``max_num_tokens - length`` (negative = over the cap)."""
    return params.max_num_tokens - length
