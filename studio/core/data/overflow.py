"""Rows longer than max_length, by the spec's `overflow` policy (spec.py), on whole tables:
- window: consecutive windows of max_length tokens, each an example (examples.windows; `stride` overlap);
- truncate: keep the first max_length tokens; classification rows are cut by the tokenizer itself, so that its
  closing special token ([SEP]) survives;
- truncate_left: keep the last max_length tokens, so that the last response and what follows it survive; a row
  whose last response alone does not fit is left out, and an earlier reply the cut starts in the middle of stops
  carrying loss (it would train from its middle);
- drop: leave the row out.
Rows left out come back with the reason, for the bad-row list.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from studio.core.data.encoding import concatenate, encode_truncated
from studio.core.data.examples import ExampleTable, gather_ranges, truncate, windows
from studio.core.data.formats import Rendered


def fit(table: ExampleTable, overflow: str, max_length: int, stride: int = 0, tokenizer: Any = None,
        rendered: Sequence[Rendered] = ()) -> tuple[ExampleTable, dict[int, str]]:
    """The rows of `table` as examples of at most max_length tokens, and {row index: why it is left out}.
    Classification cuts need the `tokenizer` and the rows' `rendered` text."""
    over = table.lengths > max_length
    if overflow == "window":
        return windows(table, max_length, stride), {}
    if not over.any():
        return table, {}
    if overflow == "drop":
        reasons = {i: f"is {int(table.lengths[i])} tokens, longer than max_length={max_length}: left out "
                   "(overflow: drop)" for i in np.flatnonzero(over).tolist()}
        return table.take(np.flatnonzero(~over)), reasons
    if overflow == "truncate" and table.class_ids is not None:
        cut = encode_truncated(tokenizer, [rendered[i] for i in np.flatnonzero(over).tolist()], max_length)
        return _replace_rows(table, over, cut), {}
    if overflow == "truncate":
        return truncate(table, max_length), {}
    cut, keep, reasons = _keep_ends(table, max_length)
    return cut.take(keep), reasons


def _replace_rows(table: ExampleTable, which: np.ndarray, replacements: ExampleTable) -> ExampleTable:
    """`table` with the rows where `which` is True replaced, in order, by the rows of `replacements`."""
    both = concatenate([table, replacements])
    order = np.arange(len(table))
    order[which] = len(table) + np.arange(len(replacements))
    result = both.take(order)
    return ExampleTable(result.ids, result.loss, result.starts, table.full_lengths, table.class_ids)


def _keep_ends(table: ExampleTable, limit: int) -> tuple[ExampleTable, list[int], dict[int, str]]:
    """truncate_left (see the module docstring): the cut table, the rows to keep, and why the others cannot be."""
    loss = table.loss.copy()
    begins = table.starts[:-1].copy()
    keep, reasons = [], {}
    for i, (start, end) in enumerate(zip(table.starts[:-1].tolist(), table.starts[1:].tolist())):
        n = end - start
        if n <= limit:
            keep.append(i)
            continue
        flags = loss[start:end]  # a view: clearing a flag here clears it in `loss`
        last = n - 1 - int(np.argmax(flags[::-1]))  # the last loss token
        first = last
        while first > 0 and flags[first - 1]:
            first -= 1
        if n - first > limit:
            reasons[i] = (f"its last response and what follows it are {n - first} tokens, longer than "
                          f"max_length={limit}: left out (overflow: truncate_left keeps whole responses)")
            continue
        cut = n - limit
        if flags[cut] and flags[cut - 1]:  # a reply that began before the cut: none of its rest trains
            flags[cut:cut + int(np.argmin(flags[cut:]))] = False
        begins[i] = start + cut
        keep.append(i)
    sizes = np.minimum(table.lengths, limit)
    tokens = gather_ranges(begins, sizes)
    cut_table = ExampleTable(table.ids[tokens], loss[tokens], np.concatenate([[0], np.cumsum(sizes)]),
                             table.full_lengths)
    return cut_table, keep, reasons
