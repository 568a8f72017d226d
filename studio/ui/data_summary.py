"""The data panel's words: what the prepared data becomes (examples, or documents and their windows; tokens; rows
over the maximum length and what became of them; the optimizer steps of one epoch), and each data setting's help
text from `DataSpec`'s field metadata, for tooltips."""

from __future__ import annotations

from studio.core.data.dataset import DataSpec, PreparedData
from studio.core.data.epochs import steps_per_epoch

# what each overflow policy does to a row longer than the maximum length: the combo's text, the summary's words
OVERFLOW_CHOICES = {"window": "split into windows", "truncate": "cut at the end", "truncate_left":
                    "cut the prompt from the left", "drop": "leave the row out"}
OVERFLOW_FATES = {"window": "split into windows", "truncate": "cut at the maximum length", "truncate_left":
                  "prompts cut from the left", "drop": "left out (listed with the bad rows)"}


def field_help(name: str) -> str:
    """A data setting's help text (DataSpec's field metadata), for its widget's tooltip."""
    return str(DataSpec.__dataclass_fields__[name].metadata.get("help", ""))


def summary_html(prepared: PreparedData, batch_size: int, accumulation: int) -> str:
    """What the data becomes: examples (or documents and their windows), tokens, rows over the maximum length
    and what became of them, and how many optimizer steps one epoch is at this batch size."""
    stats, train = prepared.stats, prepared.train
    packed = len(train) != prepared.examples or train.piece_starts is not None
    if prepared.format == "text":
        text = (f"<b>{stats.count:,}</b> document{'s' if stats.count != 1 else ''} → <b>{prepared.examples:,}</b> "
                f"training window{'s' if prepared.examples != 1 else ''}, <b>{train.token_count:,}</b> tokens"
                + (f", packed into <b>{len(train):,}</b> sequences" if packed else "")
                + f"; <b>{len(prepared.val):,}</b> validation examples.")
    else:
        text = (f"<b>{len(train):,}</b> training and <b>{len(prepared.val):,}</b> validation examples"
                f"{' (packed)' if packed else ''}.")
    text += (f" Tokens per row: min {stats.min}, median {stats.median:.0f}, 95% under {stats.p95:.0f}, "
             f"max {stats.max}; ")
    if prepared.overflow == "truncate":
        text += f"<b>{stats.truncated:,}</b> cut at the maximum length {stats.max_length}."
    else:
        text += (f"<b>{stats.truncated:,}</b> longer than the maximum length {stats.max_length}: "
                 f"{OVERFLOW_FATES[prepared.overflow]}.")
    steps = steps_per_epoch(len(train), batch_size, accumulation)
    text += (f" One epoch: <b>{steps:,.4g}</b> optimizer step{'s' if steps != 1 else ''} at batch {batch_size}"
             f"{f' × {accumulation} accumulated' if accumulation > 1 else ''}.")
    return text
