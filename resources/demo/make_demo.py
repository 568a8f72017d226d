"""Write the built-in demo dataset: calendar dates in three English styles -> ISO 8601 (YYYY-MM-DD).

Deterministic (fixed seed): `python resources/demo/make_demo.py` rewrites train.jsonl and heldout.jsonl beside it
byte for byte. No date appears in both files.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import tempfile
from pathlib import Path

SEED = 20240305
TRAIN_SIZE = 300
HELDOUT_SIZE = 60
FIRST_DAY = datetime.date(1950, 1, 1)
DAYS = (datetime.date(2049, 12, 31) - FIRST_DAY).days + 1
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")  # not strftime("%B"): that follows the locale
PROMPT = "Write this date in ISO format (YYYY-MM-DD): {date}"


def spoken(day: datetime.date, style: int) -> str:
    """The date as people write it: 'March 5, 2021', '5 March 2021' or 'Mar 5, 2021'."""
    month = MONTHS[day.month - 1]
    if style == 0:
        return f"{month} {day.day}, {day.year}"
    if style == 1:
        return f"{day.day} {month} {day.year}"
    return f"{month[:3]} {day.day}, {day.year}"


def rows(rng: random.Random, days: list[datetime.date]) -> list[dict[str, str]]:
    return [{"prompt": PROMPT.format(date=spoken(day, rng.randrange(3))), "response": day.isoformat()} for day in days]


def write_jsonl(path: Path, items: list[dict[str, str]]) -> None:
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        out.writelines(json.dumps(item) + "\n" for item in items)
    os.replace(staging, path)


def main() -> None:
    rng = random.Random(SEED)
    offsets = rng.sample(range(DAYS), TRAIN_SIZE + HELDOUT_SIZE)
    days = [FIRST_DAY + datetime.timedelta(days=o) for o in offsets]
    here = Path(__file__).resolve().parent
    write_jsonl(here / "train.jsonl", rows(rng, days[:TRAIN_SIZE]))
    write_jsonl(here / "heldout.jsonl", rows(rng, days[TRAIN_SIZE:]))


if __name__ == "__main__":
    main()
