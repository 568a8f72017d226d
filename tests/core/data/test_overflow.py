"""Rows longer than max_length: text becomes windows (every token trained once, EOS between documents, packing
included), or is cut or dropped on request; instruction and chat rows are dropped and listed, or lose the start of
their prompt so that the response survives; each policy's counts. All on the real tokenizer and real files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from studio.core.data.dataset import IGNORE_INDEX, PREVIEW_TOKENS, DataSpec, prepare, preview
from studio.core.data.examples import ExampleTable, pack, windows
from studio.core.errors import DataError

WORDS = "river stone cloud window lantern meadow harbour candle orchard thunder".split()


def document(words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), words))


def tokens_of(tokenizer, text: str) -> list[int]:
    """A document's tokens as training sees them: the tokenizer's, then EOS."""
    return tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def trained_positions(table: ExampleTable) -> list[int]:
    """For each token of the concatenated examples, whether its label is kept (carries loss)."""
    return [label != IGNORE_INDEX for example in table for label in example.labels]


# -- text: windows -------------------------------------------------------------------------------------------------
def test_a_long_document_becomes_exact_windows_with_every_token_trained_once(tmp_path, default_tokenizer):
    text = document(900, seed=1)
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    expected = tokens_of(default_tokenizer, text)
    prepared = prepare(DataSpec(str(tmp_path / "book.txt"), max_length=64), default_tokenizer)  # txt_mode file
    assert prepared.format == "text" and prepared.overflow == "window"
    assert len(prepared.train) == math.ceil(len(expected) / 64) == prepared.examples
    assert [len(e.input_ids) for e in prepared.train][:-1] == [64] * (len(prepared.train) - 1)
    assert [t for e in prepared.train for t in e.input_ids] == expected  # in order, nothing lost or repeated
    assert all(trained_positions(prepared.train))  # each token's label is kept in the one window holding it
    assert prepared.stats.count == 1 and prepared.stats.max == len(expected) and prepared.stats.truncated == 1
    assert prepared.train.token_count == len(expected) and not prepared.bad_rows


def test_windows_with_an_overlap_repeat_context_without_training_it_twice(tmp_path, default_tokenizer):
    text = document(500, seed=2)
    (tmp_path / "doc.txt").write_text(text, encoding="utf-8")
    expected = tokens_of(default_tokenizer, text)
    prepared = prepare(DataSpec(str(tmp_path / "doc.txt"), max_length=64, stride=16), default_tokenizer)
    step = 64 - 16
    assert len(prepared.train) == 1 + math.ceil((len(expected) - 64) / step)
    trained = np.zeros(len(expected), dtype=int)
    for k, example in enumerate(prepared.train):
        assert list(example.input_ids) == expected[k * step: k * step + 64]
        kept = np.flatnonzero(np.asarray(example.labels) != IGNORE_INDEX)
        assert k == 0 or kept.min() == 16  # the repeated 16 tokens are context only
        trained[k * step + kept] += 1
    assert trained.tolist() == [1] * len(expected)


def test_documents_never_share_a_window_and_pack_with_an_eos_between_them(tmp_path, default_tokenizer):
    docs = [document(n, seed=n) for n in (150, 12, 230, 7, 40)]
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(docs), encoding="utf-8")
    eos = default_tokenizer.eos_token_id
    streams = [tokens_of(default_tokenizer, d) for d in docs]
    plain = prepare(DataSpec(str(path), txt_mode="blocks", max_length=64), default_tokenizer)
    assert len(plain.train) == sum(math.ceil(len(s) / 64) for s in streams) == plain.examples
    position = 0
    for stream in streams:  # each document's windows, in order, hold exactly its tokens
        count = math.ceil(len(stream) / 64)
        assert [t for e in plain.train[position:position + count] for t in e.input_ids] == stream
        position += count

    packed = prepare(DataSpec(str(path), txt_mode="blocks", max_length=64, packing=True), default_tokenizer)
    assert len(packed.train) < len(plain.train) and packed.examples == len(plain.train)
    assert all(len(e.input_ids) <= 64 for e in packed.train)
    pieces = []  # each pack holds whole windows (packed best-fit, not in file order): none runs into the next
    for e in packed.train:
        starts = [i for i, p in enumerate(e.position_ids) if p == 0] + [len(e.input_ids)]
        pieces += [e.input_ids[a:b] for a, b in zip(starts, starts[1:])]
    assert sorted(pieces) == sorted(e.input_ids for e in plain.train)
    assert sum(piece[-1] == eos for piece in pieces) == len(streams)  # each document's last window ends in EOS


def test_windows_and_pack_on_arrays_match_the_definition():
    table = ExampleTable.of([])
    assert len(windows(table, 8)) == 0
    from studio.core.data.examples import Example

    rows = ExampleTable.of([Example(tuple(range(1, 21)), tuple(range(1, 21)), 20), Example((7, 8), (7, 8), 2)])
    cut = windows(rows, 8, stride=2)
    assert [e.input_ids for e in cut] == [tuple(range(1, 9)), tuple(range(7, 15)), tuple(range(13, 21)), (7, 8)]
    assert cut[1].labels == (IGNORE_INDEX, IGNORE_INDEX, *range(9, 15)) and cut[1].full_length == 20
    (first, *_), = [pack(cut, 16)]
    assert first.position_ids == tuple(range(8)) + tuple(range(8))


def test_text_can_be_cut_or_dropped_on_request(tmp_path, default_tokenizer):
    long, short = document(200, seed=3), document(10, seed=4)
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": long}, {"text": short}])
    cut = prepare(DataSpec(str(path), max_length=32, overflow="truncate"), default_tokenizer)
    assert [list(e.input_ids) for e in cut.train] == [tokens_of(default_tokenizer, long)[:32],
                                                      tokens_of(default_tokenizer, short)]
    assert cut.train[0].truncated and cut.stats.truncated == 1 and not cut.bad_rows
    dropped = prepare(DataSpec(str(path), max_length=32, overflow="drop"), default_tokenizer)
    assert [list(e.input_ids) for e in dropped.train] == [tokens_of(default_tokenizer, short)]
    assert dropped.dropped == 1 and [(b.row, b.reason) for b in dropped.bad_rows] == [
        (1, f"is {len(tokens_of(default_tokenizer, long))} tokens, longer than max_length=32: left out "
            "(overflow: drop)")]


def test_preview_of_a_long_document_shows_its_tokens_and_its_windows(tmp_path, default_tokenizer):
    text = document(300, seed=5)
    (tmp_path / "doc.txt").write_text(text, encoding="utf-8")
    shown = preview(DataSpec(str(tmp_path / "doc.txt"), max_length=64), default_tokenizer, 0)
    expected = tokens_of(default_tokenizer, text)
    assert shown.length == shown.kept == len(expected) and shown.windows == math.ceil(len(expected) / 64)
    assert not shown.truncated and len(shown.tokens) == len(expected) and all(loss for _, loss in shown.tokens)
    assert "".join(piece for piece, _ in shown.tokens) == text + "<|im_end|>"
    (tmp_path / "book.txt").write_text(document(6000, seed=6), encoding="utf-8")
    book = preview(DataSpec(str(tmp_path / "book.txt"), max_length=64), default_tokenizer, 0)
    assert len(book.tokens) == PREVIEW_TOKENS < book.kept == book.length  # a book's preview shows its start


# -- instruction and chat ------------------------------------------------------------------------------------------
def long_rows() -> list[dict]:
    return [
        {"prompt": "Capital of France?", "response": "Paris"},
        {"prompt": "Summarise: " + document(300, seed=6), "response": "A story about weather."},
        {"prompt": "Repeat it.", "response": document(300, seed=7)},
    ]


def test_instruction_rows_over_max_length_are_dropped_and_listed_by_default(tmp_path, default_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", long_rows())
    prepared = prepare(DataSpec(str(path), max_length=96), default_tokenizer)
    assert prepared.overflow == "drop" and len(prepared.train) == 1 and prepared.dropped == 2
    assert prepared.stats.count == 3 and prepared.stats.truncated == 2  # the count shown before training
    assert [b.row for b in prepared.bad_rows] == [2, 3]
    assert all(b.reason.endswith("longer than max_length=96: left out (overflow: drop)") for b in prepared.bad_rows)
    assert all(not e.truncated for e in prepared.train)


def test_truncate_left_keeps_the_response_and_cuts_the_prompt(tmp_path, default_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", long_rows())
    prepared = prepare(DataSpec(str(path), max_length=96, overflow="truncate_left"), default_tokenizer)
    assert len(prepared.train) == 2 and prepared.dropped == 1
    short, cut = prepared.train
    assert not short.truncated and cut.truncated and len(cut.input_ids) == 96
    loss_text = default_tokenizer.decode([t for t, lab in zip(cut.input_ids, cut.labels) if lab != IGNORE_INDEX])
    assert loss_text == "A story about weather.<|im_end|>"
    assert "Summarise" not in default_tokenizer.decode(cut.input_ids)  # the prompt's start is gone
    (bad,) = prepared.bad_rows
    assert bad.row == 3 and "its last response and what follows it are" in bad.reason
    assert prepared.stats.truncated == 2  # two rows over: one cut, one left out


def test_truncate_left_stops_training_a_reply_it_cut_in_the_middle(tmp_path, default_tokenizer):
    messages = [
        {"role": "user", "content": "Tell me about rivers."},
        {"role": "assistant", "content": document(120, seed=8)},
        {"role": "user", "content": "And in one word?"},
        {"role": "assistant", "content": "Water."},
    ]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])
    full = prepare(DataSpec(str(path), max_length=4096), default_tokenizer).train[0]
    prepared = prepare(DataSpec(str(path), max_length=64, overflow="truncate_left"), default_tokenizer)
    (example,) = prepared.train
    assert list(example.input_ids) == list(full.input_ids[-64:])
    loss_text = default_tokenizer.decode([t for t, lab in zip(example.input_ids, example.labels) if lab != -100])
    assert loss_text == "Water.<|im_end|>"  # the first reply lost its start, so none of it trains
    shown = preview(DataSpec(str(path), max_length=64, overflow="truncate_left"), default_tokenizer, 0)
    assert shown.truncated and shown.kept == 64 and shown.length == len(full.input_ids)
    assert [loss for _, loss in shown.tokens] == [lab != -100 for lab in example.labels]


def test_classification_rows_can_be_dropped_instead_of_cut(tmp_path, default_tokenizer):
    path = write_jsonl(tmp_path / "n.jsonl", [{"text": document(100, 9), "label": "a"}, {"text": "ok", "label": "b"}])
    prepared = prepare(DataSpec(str(path), max_length=16, overflow="drop"), default_tokenizer)
    assert [e.class_id for e in prepared.train] == [1] and prepared.dropped == 1 and prepared.label_names == ("a", "b")


@pytest.mark.parametrize("settings, message", [
    ({"format": "instruction", "overflow": "window"}, "overflow window does not apply to the instruction format"),
    ({"format": "chat", "overflow": "truncate"}, "use drop or truncate_left"),
    ({"overflow": "drop", "stride": 4}, "stride is the overlap of windows"),
    ({"stride": 64}, "stride must be an integer from 0 to max_length - 1"),
    ({"overflow": "sideways"}, "overflow must be auto, window"),
])
def test_overflow_settings_that_do_not_fit_the_format_are_refused(settings, message):
    with pytest.raises(DataError, match=message):
        DataSpec("a.jsonl", max_length=64, **settings)


def test_stride_on_rows_that_are_not_windowed_is_refused_once_the_format_is_known(tmp_path, default_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", long_rows()[:1])
    with pytest.raises(DataError, match="instruction rows are not split into windows"):
        prepare(DataSpec(str(path), max_length=64, stride=8), default_tokenizer)
