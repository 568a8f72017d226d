"""The prepared-data cache: a second prepare reads the same result back; the file's content, the tokenizer and the
data settings each invalidate it; entries are whole files in the studio's data cache folder. And the scale the
pipeline is built for: 100,000 generated rows in seconds (slow)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest

from studio.core.data import cache
from studio.core.data.dataset import DataSpec, prepare

WORDS = "when is the meeting date answer cat dog river table lamp value first second third".split()


@pytest.fixture()
def data_cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "data-cache"
    monkeypatch.setenv("LORA_STUDIO_DATA_CACHE", str(folder))
    return folder


def instruction_rows(path: Path, count: int, seed: int = 0, longest: int = 60) -> Path:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(count):
            prompt = " ".join(rng.choices(WORDS, k=rng.randint(3, longest)))
            handle.write(json.dumps({"prompt": prompt, "response": " ".join(rng.choices(WORDS, k=rng.randint(1, 40)))})
                         + "\n")
    return path


def same(a, b) -> bool:
    return (a.format == b.format and dict(a.columns) == dict(b.columns) and a.bad_rows == b.bad_rows
            and a.examples == b.examples and a.dropped == b.dropped and a.overflow == b.overflow
            and all(np.array_equal(getattr(x, name), getattr(y, name))
                    for x, y in ((a.train, b.train), (a.val, b.val)) for name in ("ids", "loss", "starts"))
            and np.array_equal(a.stats.lengths, b.stats.lengths) and list(a.train) == list(b.train))


def test_the_second_prepare_reads_the_first_ones_result_from_the_cache(tmp_path, data_cache, default_tokenizer):
    path = instruction_rows(tmp_path / "d.jsonl", 200)
    with path.open("a") as handle:
        handle.write('{"prompt": "no answer"}\n')
    spec = DataSpec(str(path), val_fraction=0.1, packing=True, max_length=64)
    first = prepare(spec, default_tokenizer)
    assert not first.from_cache and len(list(data_cache.glob("*.npz"))) == 1
    second = prepare(spec, default_tokenizer)
    assert second.from_cache and same(first, second) and len(second.bad_rows) >= 1
    assert not [p for p in data_cache.iterdir() if p.suffix != ".npz"]  # written whole: no temp file left
    assert same(prepare(spec, default_tokenizer, use_cache=False), first)


def test_a_changed_file_tokenizer_or_setting_misses_the_cache(tmp_path, data_cache, default_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model.folder)
    path = instruction_rows(tmp_path / "d.jsonl", 50)
    spec = DataSpec(str(path), max_length=64)
    assert not prepare(spec, tokenizer).from_cache
    assert prepare(spec, tokenizer).from_cache

    assert not prepare(DataSpec(str(path), max_length=65), tokenizer).from_cache  # settings
    assert not prepare(DataSpec(str(path), max_length=64, overflow="truncate_left"), tokenizer).from_cache

    instruction_rows(path, 50, seed=1)  # the file's content
    changed = prepare(spec, tokenizer)
    assert not changed.from_cache and prepare(spec, tokenizer).from_cache

    tokenizer.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")  # the tokenizer
    retemplated = prepare(spec, tokenizer)
    assert not retemplated.from_cache and not same(retemplated, changed)
    assert len(list(data_cache.glob("*.npz"))) == 5


def test_the_cache_keeps_only_the_most_recently_used_entries_within_its_size(tmp_path, data_cache, default_tokenizer,
                                                                               monkeypatch):
    monkeypatch.setattr(cache, "MAX_ENTRIES", 2)
    path = instruction_rows(tmp_path / "d.jsonl", 5)
    for length in (200, 201, 202):
        prepare(DataSpec(str(path), max_length=length), default_tokenizer)
    assert len(list(data_cache.glob("*.npz"))) == 2
    assert prepare(DataSpec(str(path), max_length=202), default_tokenizer).from_cache
    assert not prepare(DataSpec(str(path), max_length=200), default_tokenizer).from_cache
    monkeypatch.setattr(cache, "MAX_BYTES", 1)  # over the size: only the newest stays
    prepare(DataSpec(str(path), max_length=203), default_tokenizer)
    assert len(list(data_cache.glob("*.npz"))) == 1
    assert prepare(DataSpec(str(path), max_length=203), default_tokenizer).from_cache


@pytest.mark.slow
def test_a_hundred_thousand_rows_prepare_in_seconds_and_come_back_from_the_cache(tmp_path, data_cache,
                                                                                  default_tokenizer):
    path = instruction_rows(tmp_path / "big.jsonl", 100_000, longest=40)
    spec = DataSpec(str(path), max_length=128)
    started = time.process_time()  # CPU time: other processes on the machine do not count against it
    prepared = prepare(spec, default_tokenizer)
    seconds = time.process_time() - started
    assert len(prepared.train) + prepared.dropped == 100_000 and not prepared.from_cache
    assert seconds < 30, f"preparing 100,000 rows took {seconds:.1f} s of CPU time"
    assert prepared.train.ids.dtype == np.uint16 and prepared.train.nbytes < 4 * prepared.train.token_count
    again = prepare(spec, default_tokenizer)
    assert again.from_cache and np.array_equal(again.train.ids, prepared.train.ids)
