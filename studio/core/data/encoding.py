"""Rendered rows into tokens, in batches: one call of the fast tokenizer's backend (the `tokenizers` library) per
ENCODE_BATCH rows, its ids and character offsets read straight into numpy, and the loss flags found for every
token of the batch at once.

A token carries loss when it holds a character of a loss span of its row (formats.py): a span's tokens run from
the first token holding its first character to the last token holding its last one. Tokens added outside the
text (BOS) hold no character and carry no loss. Rows that ask for it (`eos_loss`) end in the EOS token with loss:
appended unless the tokenizer put it there itself.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from itertools import chain
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from studio.core.data.examples import ExampleTable
from studio.core.data.formats import Rendered
from studio.core.errors import DataError

ENCODE_BATCH = 2048  # rows per backend call: its Encoding objects cost ~100 bytes a token until read out
AHEAD = 2  # batches rendered ahead of the one being tokenized


def encode(tokenizer: Any, rendered: Sequence[Rendered], *, with_loss: bool = True) -> ExampleTable:
    """All rows as one table (row i is example i), with loss flags unless `with_loss` is False."""
    backend = _backend(tokenizer)
    parts = []
    for first in range(0, len(rendered), ENCODE_BATCH):
        batch = rendered[first:first + ENCODE_BATCH]
        runs = _runs_of_same_kind(batch)
        parts.extend(_encode_batch(tokenizer, backend, batch[a:b], with_loss) for a, b in runs)
    return concatenate(parts)


def encode_batches(tokenizer: Any, batches: Iterable[Sequence[Rendered]], *, with_loss: bool = True) -> ExampleTable:
    """All rows of `batches` as one table. Each batch is tokenized on a worker thread while the caller's iterator
    produces the next one (the backend lets go of the interpreter while it encodes), so that reading and rendering
    cost no time of their own."""
    encoded: list[ExampleTable] = []
    pending: deque[Future[ExampleTable]] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") as pool:
        for batch in batches:
            pending.append(pool.submit(encode, tokenizer, batch, with_loss=with_loss))
            if len(pending) > AHEAD:  # rendering outruns tokenizing: hold only a few batches of text
                encoded.append(pending.popleft().result())
        encoded.extend(job.result() for job in pending)
    return concatenate(encoded)


def encode_truncated(tokenizer: Any, rendered: Sequence[Rendered], max_length: int) -> ExampleTable:
    """Rows cut to max_length by the tokenizer itself (its closing special tokens, like [SEP], survive); no loss."""
    with _truncation(tokenizer, max_length):
        return encode(tokenizer, rendered, with_loss=False)


def pieces(tokenizer: Any, rendered: Rendered, truncate_to: int | None = None) -> list[str]:
    """The text each token of the row stands for, as `encode` (or `encode_truncated`) tokenizes it, for the
    preview. Tokens sharing characters (a UTF-8 character split over bytes) give the characters to the first of
    them; tokens added outside the text (BOS, an appended EOS) show their decoded form."""
    with _truncation(tokenizer, truncate_to):
        encoding = _backend(tokenizer).encode(rendered.text, add_special_tokens=not rendered.templated)
    shown = 0
    out = []
    for token_id, (b, e) in zip(encoding.ids, encoding.offsets):
        if b == e:
            out.append(tokenizer.decode([token_id]))
            continue
        out.append(rendered.text[shown:e] if e > shown else "")
        shown = max(shown, e)
    if rendered.eos_loss and (not encoding.ids or encoding.ids[-1] != tokenizer.eos_token_id):
        out.append(tokenizer.decode([tokenizer.eos_token_id]))
    return out


def concatenate(tables: Sequence[ExampleTable]) -> ExampleTable:
    """Unpacked tables one after another."""
    if len(tables) == 1:
        return tables[0]
    if not tables:
        return ExampleTable(np.zeros(0, np.uint16), np.zeros(0, bool), np.zeros(1, np.int64))
    offsets = np.cumsum([0] + [t.token_count for t in tables[:-1]])
    starts = np.concatenate([[0]] + [t.starts[1:] - t.starts[0] + o for t, o in zip(tables, offsets)])
    return ExampleTable(np.concatenate([t.ids for t in tables]), np.concatenate([t.loss for t in tables]), starts,
                        np.concatenate([t.full_lengths for t in tables]))


@contextmanager
def _truncation(tokenizer: Any, max_length: int | None) -> Iterator[None]:
    """The backend cuts to max_length inside the block (None: no change); its own setting comes back after."""
    backend = _backend(tokenizer)
    before = backend.truncation
    if max_length is not None:
        backend.enable_truncation(max_length, direction=getattr(tokenizer, "truncation_side", "right"))
    try:
        yield
    finally:
        if max_length is not None and before is None:
            backend.no_truncation()
        elif max_length is not None:
            backend.enable_truncation(**before)


def _backend(tokenizer: Any) -> Any:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DataError(
            "this model's tokenizer cannot map tokens to characters (it is not a 'fast' tokenizer), which loss "
            "masks need: use a model whose folder has a tokenizer.json"
        )
    return backend


def _runs_of_same_kind(rows: Sequence[Rendered]) -> list[tuple[int, int]]:
    """Index ranges of consecutive rows that are encoded alike (templated text holds its special tokens)."""
    runs, first = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i].templated != rows[first].templated:
            runs.append((first, i))
            first = i
    return runs


def _encode_batch(tokenizer: Any, backend: Any, rows: Sequence[Rendered], with_loss: bool) -> ExampleTable:
    if backend.padding is not None:
        backend.no_padding()
    encodings = backend.encode_batch([r.text for r in rows], add_special_tokens=not rows[0].templated)
    lengths = np.fromiter(map(len, encodings), dtype=np.int64, count=len(encodings))
    starts = np.concatenate([[0], np.cumsum(lengths)])
    total = int(starts[-1])
    ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=np.int64, count=total)
    if not with_loss:
        return ExampleTable(ids, np.zeros(total, dtype=bool), starts).compact()
    loss = _loss_flags(encodings, rows, starts)
    return _with_eos(ExampleTable(ids, loss, starts), rows, tokenizer.eos_token_id).compact()


def _loss_flags(encodings: Sequence[Any], rows: Sequence[Rendered], starts: np.ndarray) -> np.ndarray:
    """Whether each token overlaps a loss span of its row (see the module docstring): per span, the first and the
    last token holding one of its characters, asked of the encoding (reading every token's offsets into Python
    would cost more than the tokenizing saved by batching)."""
    marks = np.zeros(int(starts[-1]) + 1, dtype=np.int32)  # +1 where a run of loss tokens starts, -1 after it
    for encoding, row, base in zip(encodings, rows, starts[:-1].tolist()):
        for start, end in _merged(row.loss_spans):
            first = _token_holding(encoding, range(start, end))
            if first is None:
                continue
            last = _token_holding(encoding, range(end - 1, start - 1, -1))
            while last + 1 < len(encoding) and _holds(encoding.token_to_chars(last + 1), end - 1):
                last += 1  # a character split over byte tokens is held by each of them
            marks[base + first] += 1
            marks[base + last + 1] -= 1
    return np.cumsum(marks[:-1]) > 0


def _token_holding(encoding: Any, chars: range) -> int | None:
    """The first token holding the first character of `chars` that a token holds (a normalizer may drop some)."""
    for char in chars:
        token = encoding.char_to_token(char)
        if token is not None:
            return token
    return None


def _holds(span: tuple[int, int] | None, char: int) -> bool:
    return span is not None and span[0] <= char < span[1]


def _merged(spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Non-empty spans in order, touching ones joined: boundaries must strictly increase."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if end <= start:
            continue
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(end, out[-1][1]))
        else:
            out.append((start, end))
    return out


def _with_eos(table: ExampleTable, rows: Sequence[Rendered], eos_id: int | None) -> ExampleTable:
    """EOS with loss at the end of each row that asks for it (appended where the tokenizer did not put it)."""
    wants = np.fromiter((r.eos_loss for r in rows), dtype=bool, count=len(rows)) & (eos_id is not None)
    if not wants.any():
        return table
    lengths = table.lengths
    last = np.maximum(table.starts[1:] - 1, 0)
    has_eos = (lengths > 0) & (table.ids[last] == eos_id)
    table.loss[last[wants & has_eos]] = True
    append = wants & ~has_eos
    at = table.starts[1:][append]
    ids = np.insert(table.ids, at, eos_id)
    loss = np.insert(table.loss, at, True)
    starts = table.starts + np.concatenate([[0], np.cumsum(append)])
    return ExampleTable(ids, loss, starts)
