"""Tokenized examples, held compactly: every example's tokens in one numpy array, a loss flag per token, and the
offsets where each example starts (an example costs its tokens, 3 bytes each for vocabularies under 65,536 ids,
and not a Python tuple of ints). `ExampleTable[i]` builds the `Example` that training and evaluation read.

The ways rows become training examples, all on whole arrays:
- `windows`: a row longer than max_length becomes consecutive windows of max_length tokens, each one example.
  With an overlap (`stride`, as the tokenizers' own `stride`: tokens a window repeats from the one before it)
  the repeated tokens are context only, so that every token still carries loss exactly once.
- `truncate`: keep a row's first (or last) max_length tokens.
- `pack`: join examples into sequences of at most max_length tokens, never splitting one, by best-fit decreasing
  (the multipack idea): the longest first, each into the pack it fills best. Taking them in file order would
  close a pack as soon as the next example does not fit (about 80% full on a lognormal mix of lengths); best fit
  fills them to 98% and more, and the packs depend only on the lengths and the seed. Position ids restart at 0
  for every joined example (see dataset.py on how that keeps them apart in attention) and the first token of each
  carries no loss, so that nothing is trained to predict the start of an unrelated one.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterator, Sequence, overload

import numpy as np

IGNORE_INDEX = -100  # the label value torch's cross-entropy (and transformers' loss) skips


@dataclass(frozen=True)
class Example:
    """A tokenized training example. `labels` holds -100 where a token carries no loss (empty for
    classification, whose target is `class_id`). `full_length` counts the tokens of the row it came from, before
    it was cut or split into windows."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    full_length: int
    class_id: int | None = None
    position_ids: tuple[int, ...] | None = None  # only on packed examples

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.input_ids)


class ExampleTable(Sequence[Example]):
    """Examples in flat arrays: example i is `ids[starts[i]:starts[i + 1]]` with its `loss` flags. Packed tables
    also hold `piece_starts`, the token offsets where a joined example begins (its position ids restart)."""

    def __init__(self, ids: np.ndarray, loss: np.ndarray, starts: np.ndarray, full_lengths: np.ndarray | None = None,
                 class_ids: np.ndarray | None = None, piece_starts: np.ndarray | None = None) -> None:
        self.ids = ids
        self.loss = loss
        self.starts = np.asarray(starts, dtype=np.int64)
        self.full_lengths = self.lengths if full_lengths is None else np.asarray(full_lengths, dtype=np.int64)
        self.class_ids = class_ids
        self.piece_starts = piece_starts

    @classmethod
    def of(cls, examples: Sequence[Example]) -> ExampleTable:
        """A table holding `examples` (unpacked ones)."""
        if isinstance(examples, ExampleTable):
            return examples
        lengths = [len(e.input_ids) for e in examples]
        ids = np.fromiter((t for e in examples for t in e.input_ids), dtype=np.int64, count=sum(lengths))
        is_class = bool(examples) and examples[0].class_id is not None
        loss = np.zeros(len(ids), dtype=bool) if is_class else np.fromiter(
            (label != IGNORE_INDEX for e in examples for label in e.labels), dtype=bool, count=len(ids))
        return cls(ids, loss, np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]),
                   np.array([e.full_length for e in examples], dtype=np.int64),
                   np.array([e.class_id for e in examples], dtype=np.int64) if is_class else None)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.starts)

    @property
    def token_count(self) -> int:
        return int(self.starts[-1] - self.starts[0])

    @property
    def nbytes(self) -> int:
        arrays = (self.ids, self.loss, self.starts, self.full_lengths, self.class_ids, self.piece_starts)
        return sum(a.nbytes for a in arrays if a is not None)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __iter__(self) -> Iterator[Example]:
        return (self[i] for i in range(len(self)))

    @overload
    def __getitem__(self, index: int) -> Example: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[Example, ...]: ...

    def __getitem__(self, index: int | slice) -> Example | tuple[Example, ...]:
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(len(self))))
        if not -len(self) <= index < len(self):
            raise IndexError(f"example {index} of {len(self)}")
        index %= len(self)
        start, end = int(self.starts[index]), int(self.starts[index + 1])
        ids = self.ids[start:end].astype(np.int64)
        full_length = int(self.full_lengths[index])
        if self.class_ids is not None:
            return Example(tuple(ids.tolist()), (), full_length, class_id=int(self.class_ids[index]))
        labels = np.where(self.loss[start:end], ids, IGNORE_INDEX)
        positions = None
        if self.piece_starts is not None:
            lo, hi = np.searchsorted(self.piece_starts, [start, end])
            pieces = np.append(self.piece_starts[lo:hi], end) - start
            positions = tuple((np.arange(end - start) - np.repeat(pieces[:-1], np.diff(pieces))).tolist())
        return Example(tuple(ids.tolist()), tuple(labels.tolist()), full_length, position_ids=positions)

    def take(self, indices: Sequence[int] | np.ndarray) -> ExampleTable:
        """The examples at `indices`, in that order, as a new (unpacked) table."""
        if self.piece_starts is not None:
            raise ValueError("take works on unpacked tables: split before packing")
        indices = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[indices]
        tokens = gather_ranges(self.starts[indices], lengths)
        return ExampleTable(self.ids[tokens], self.loss[tokens], np.concatenate([[0], np.cumsum(lengths)]),
                            self.full_lengths[indices], None if self.class_ids is None else self.class_ids[indices])

    def compact(self) -> ExampleTable:
        """The same examples with ids in the smallest integer type that holds them."""
        dtype = np.uint16 if not len(self.ids) or int(self.ids.max()) < 2**16 else np.int32
        if self.ids.dtype == dtype:
            return self
        return ExampleTable(self.ids.astype(dtype, copy=False), self.loss, self.starts, self.full_lengths,
                            self.class_ids, self.piece_starts)


def gather_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of arange(s, s + n) for each (s, n): token indices of several ranges, without a loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if not total:
        return np.zeros(0, dtype=np.int64)
    keep = lengths > 0
    starts, lengths = np.asarray(starts, dtype=np.int64)[keep], lengths[keep]
    steps = np.ones(total, dtype=np.int64)
    firsts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    steps[firsts] = starts - np.concatenate([[0], starts[:-1] + lengths[:-1] - 1])  # jump to the next range
    return np.cumsum(steps)


def window_counts(lengths: np.ndarray, max_length: int, stride: int = 0) -> np.ndarray:
    """How many windows of max_length tokens, each overlapping the one before by `stride`, each row becomes."""
    step = max_length - stride
    over = np.maximum(np.asarray(lengths, dtype=np.int64) - max_length, 0)
    return 1 + -(-over // step)


def windows(table: ExampleTable, max_length: int, stride: int = 0) -> ExampleTable:
    """Rows longer than max_length as consecutive windows (see the module docstring); shorter rows as they are."""
    lengths = table.lengths
    counts = window_counts(lengths, max_length, stride)
    if int(counts.max(initial=1)) == 1:
        return table
    row = np.repeat(np.arange(len(lengths)), counts)
    nth = np.arange(len(row)) - np.repeat(np.cumsum(counts) - counts, counts)  # window number within its row
    offset = nth * (max_length - stride)
    sizes = np.minimum(offset + max_length, lengths[row]) - offset
    begins = table.starts[row] + offset
    if stride == 0:  # consecutive windows of one array: new boundaries, no copy
        return ExampleTable(table.ids, table.loss, np.append(begins, table.starts[-1]), table.full_lengths[row])
    tokens = gather_ranges(begins, sizes)
    loss = table.loss[tokens].copy()
    new_starts = np.concatenate([[0], np.cumsum(sizes)])
    context = gather_ranges(new_starts[:-1][nth > 0], np.full(int((nth > 0).sum()), stride))
    loss[context] = False  # trained in the window before
    return ExampleTable(table.ids[tokens], loss, new_starts, table.full_lengths[row])


def truncate(table: ExampleTable, max_length: int, keep: str = "start") -> ExampleTable:
    """Each row cut to max_length tokens, keeping its start or (keep="end") its end."""
    lengths = table.lengths
    if int(lengths.max(initial=0)) <= max_length:
        return table
    sizes = np.minimum(lengths, max_length)
    begins = table.starts[:-1] + (lengths - sizes if keep == "end" else 0)
    tokens = gather_ranges(begins, sizes)
    return ExampleTable(table.ids[tokens], table.loss[tokens], np.concatenate([[0], np.cumsum(sizes)]),
                        table.full_lengths, table.class_ids)


def pack(examples: Sequence[Example] | ExampleTable, max_length: int, seed: int = 0) -> ExampleTable:
    """Join examples into sequences of at most `max_length` tokens, never splitting one, chosen by
    `best_fit_decreasing` (see the module docstring); the same packs for the same examples and seed."""
    table = ExampleTable.of(examples)
    if not len(table):
        return ExampleTable(table.ids, table.loss, table.starts, table.full_lengths, piece_starts=table.starts[:-1])
    bins = best_fit_decreasing(table.lengths, max_length, seed)
    table = table.take(np.concatenate(bins))  # the examples in packing order: each pack's members together
    bounds = np.concatenate([[0], np.cumsum([len(members) for members in bins])])
    loss = table.loss.copy()
    loss[table.starts[:-1][table.lengths > 0]] = False
    full = np.add.reduceat(table.full_lengths, bounds[:-1])
    return ExampleTable(table.ids, loss, table.starts[bounds], full, piece_starts=table.starts[:-1].copy())


def best_fit_decreasing(lengths: np.ndarray, capacity: int, seed: int = 0) -> list[np.ndarray]:
    """Bins of example indices, each bin's lengths summing to at most `capacity` (an example longer than that
    alone in its bin): the longest example first, each into the open bin it fills best (the least room left
    after it), a new bin when none has room. Examples of equal length go in an order drawn from `seed`, so the
    packs are a function of the lengths and the seed. Bins come out in the order they were opened."""
    lengths = np.asarray(lengths, dtype=np.int64)
    tie_break = np.random.default_rng(seed).permutation(len(lengths))
    order = np.lexsort((tie_break, -lengths))
    members: list[list[int]] = []
    room_of: list[int] = []
    by_room: dict[int, list[int]] = {}  # room left -> the open bins with exactly that room
    rooms: list[int] = []  # the distinct rooms of open bins, sorted: at most `capacity` values
    for index, length in zip(order.tolist(), lengths[order].tolist()):
        at = bisect.bisect_left(rooms, length)
        if at == len(rooms):  # no open bin has room: a new one
            members.append([])
            room_of.append(capacity)
            chosen = len(members) - 1
        else:  # the bin with the least room that still holds it
            open_bins = by_room[rooms[at]]
            chosen = open_bins.pop()
            if not open_bins:
                del by_room[rooms[at]]
                rooms.pop(at)
        members[chosen].append(index)
        room_of[chosen] -= length
        if room_of[chosen] > 0:
            if room_of[chosen] not in by_room:
                by_room[room_of[chosen]] = []
                bisect.insort(rooms, room_of[chosen])
            by_room[room_of[chosen]].append(chosen)
    return [np.asarray(bin_, dtype=np.int64) for bin_ in members]
