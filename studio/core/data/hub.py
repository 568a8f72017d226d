"""Datasets on the Hugging Face hub, named by id where a file path would go: `owner/name`, with an optional config
and split, `owner/name:config@split` (the split defaults to train and may be a slice such as `train[:10%]`).
They load through the `datasets` library, which keeps its own cache: once a dataset was downloaded, it loads again
without a network. Offline (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE set, or no network) an id that is not in that
cache fails with a message saying how to get it; a local file always works.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from studio.core.errors import DataError

# owner/name (or a bare canonical name), :config, @split; a data file's suffix makes a path a missing file instead
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?)(?::(?P<config>[\w.-]+))?(?:@(?P<split>\S+))?$")
FILE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt", ".arrow", ".gz", ".zip")


@dataclass(frozen=True)
class HubSource:
    repo: str
    config: str | None = None
    split: str = "train"

    def __str__(self) -> str:
        return self.repo + (f":{self.config}" if self.config else "") + f"@{self.split}"


def parse_hub_id(text: str) -> HubSource | None:
    """The hub dataset `text` names, or None when it cannot be one (a path with a data file's suffix, a folder
    path, an absolute path)."""
    match = HUB_ID.match(text.strip())
    if match is None or match["repo"].lower().endswith(FILE_SUFFIXES):
        return None
    return HubSource(match["repo"], match["config"], match["split"] or "train")


def open_hub_dataset(source: HubSource) -> Any:
    """The split as a `datasets.Dataset` (memory-mapped from datasets' cache). Raises DataError with what to do."""
    import datasets

    quiet = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(source.repo, source.config, split=source.split)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as exc:
        if datasets.config.HF_HUB_OFFLINE or datasets.config.HF_DATASETS_OFFLINE:
            raise DataError(
                f"{source.repo} is not a local file, and as a hub dataset it is not in this machine's datasets cache "
                "(offline: HF_HUB_OFFLINE is set). Download it once with a network, e.g. python -c \"import datasets; "
                f"datasets.load_dataset('{source.repo}'{_config_arg(source)})\", or choose a local file"
            ) from exc
        raise DataError(f"{source.repo} is neither a local file nor a hub dataset that can be loaded: "
                        f"{_one_line(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - datasets raises ValueError, KeyError, ... for a bad config or split
        raise DataError(f"cannot load the hub dataset {source}: {_one_line(exc)}") from exc
    finally:
        if not quiet:
            datasets.enable_progress_bars()


def fingerprint(dataset: Any) -> str:
    """What identifies the split's content: the Arrow files datasets prepared (their folder is named by a hash of
    the source files and the config), their sizes and times, and the number of rows (a slice of the split)."""
    files = [f["filename"] for f in dataset.cache_files]
    stamps = [(name, os.stat(name).st_size, os.stat(name).st_mtime_ns) for name in files]
    return f"{stamps}-{len(dataset)}"


def _config_arg(source: HubSource) -> str:
    return f", '{source.config}'" if source.config else ""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
