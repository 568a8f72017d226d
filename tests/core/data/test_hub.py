"""Hub dataset ids where a file would go. This machine is offline (HF_HUB_OFFLINE=1): an id that is not cached fails
with a message saying how to get it; one that is in datasets' cache loads through `datasets` itself. The cached one
is made here the way a download leaves it (the prepared Arrow files under <cache>/<owner>___<name>/<config>/...),
from local JSON lines; the download itself cannot be tested without a network."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from studio.core.data.dataset import DataSpec, prepare
from studio.core.data.hub import HubSource, parse_hub_id
from studio.core.data.tables import absolute_source, read_table
from studio.core.errors import DataError

TRAIN = [{"question": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(6)]
TEST = [{"question": "What is 10 plus 10?", "answer": "20"}]


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch) -> Path:
    """datasets' cache in a scratch folder, holding `someone/sums` as a download would have left it."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    source = tmp_path / "source"
    source.mkdir()
    files = {}
    for split, rows in (("train", TRAIN), ("test", TEST)):
        files[split] = str(source / f"{split}.jsonl")
        Path(files[split]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    builder = datasets.load_dataset_builder("json", data_files=files)
    builder.download_and_prepare()
    built = Path(builder.cache_dir)
    target = tmp_path / "datasets" / "someone___sums" / "default" / "0.0.0" / built.name
    shutil.copytree(built, target)
    for arrow in target.glob("json-*.arrow"):
        arrow.rename(arrow.with_name(arrow.name.replace("json-", "sums-")))
    info = json.loads((target / "dataset_info.json").read_text())
    info.update(dataset_name="sums", config_name="default")
    (target / "dataset_info.json").write_text(json.dumps(info))
    return tmp_path / "datasets"


@pytest.mark.parametrize("text, expected", [
    ("someone/sums", HubSource("someone/sums")),
    ("someone/sums:default@test", HubSource("someone/sums", "default", "test")),
    ("imdb@train[:10%]", HubSource("imdb", None, "train[:10%]")),
    ("data/train.jsonl", None), ("/abs/path", None), ("a/b/c", None), ("notes.txt", None),
])
def test_hub_ids_are_told_apart_from_paths(text, expected):
    assert parse_hub_id(text) == expected


def test_an_uncached_hub_id_offline_says_how_to_get_it(tmp_path, hub_cache):
    with pytest.raises(DataError) as caught:
        read_table("nobody/missing-dataset")
    message = str(caught.value)
    assert "\n" not in message and "not in this machine's datasets cache" in message and "HF_HUB_OFFLINE" in message
    assert "datasets.load_dataset('nobody/missing-dataset')" in message and "choose a local file" in message
    with pytest.raises(DataError, match="no such file or folder: .*missing.jsonl"):
        read_table(tmp_path / "missing.jsonl")  # a path that cannot be a hub id stays a missing file


def test_a_cached_hub_dataset_trains_like_a_file(hub_cache, default_tokenizer):
    table = read_table("someone/sums")
    assert table.columns == ("question", "answer") and [r.values for r in table.records] == TRAIN
    assert [r.row for r in table.records] == list(range(1, 7)) and table.path == "someone/sums"
    spec = DataSpec("someone/sums", val_path="someone/sums:default@test", max_length=128)
    prepared = prepare(spec, default_tokenizer)
    assert prepared.format == "instruction" and (len(prepared.train), len(prepared.val)) == (6, 1)
    assert prepare(spec, default_tokenizer).from_cache  # keyed by datasets' prepared files
    assert absolute_source("someone/sums@test") == "someone/sums@test"


def test_a_hub_split_or_config_that_does_not_exist_is_named(hub_cache):
    with pytest.raises(DataError, match=r"cannot load the hub dataset someone/sums@validation: .*Unknown split"):
        read_table("someone/sums@validation")
    with pytest.raises(DataError, match=r"someone/sums:other@train: .*config 'other'"):
        read_table("someone/sums:other")
