"""Fuzzing what a person hands the studio: random byte-level corruptions (fixed seed) of a run file and of a data
file, each run as `lora-studio train RUN --run-dir RUN_DIR --max-steps 1` on a tiny model through `studio.cli.main`
in this process. Whatever the bytes, the command trains or refuses: it exits 0 or 2, never with a traceback, a
refusal's last line is its one `lora-studio:` line, and nothing outside the run folder is written."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
import yaml

from studio.cli import main
from studio.core.data.dataset import DEMO_DIR

SEED = 20261129
CASES = {"run file": 200, "data file": 100}  # a data file case mostly trains (a second); a run file one is refused


def corrupt(data: bytes, rng: random.Random) -> bytes:
    """One to three byte-level edits: flip, insert, delete, duplicate or truncate, or a YAML/JSON special byte."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(data) + 1)
        edit = rng.choice(("flip", "insert", "delete", "duplicate", "truncate", "special"))
        if edit == "flip" and at < len(data):
            data[at] = rng.randrange(256)
        elif edit == "insert":
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif edit == "delete":
            del data[at:at + rng.randint(1, 16)]
        elif edit == "duplicate":
            data[at:at] = data[at:at + rng.randint(1, 32)]
        elif edit == "truncate":
            del data[at:]
        else:
            data[at:at] = rng.choice([b"{", b"}", b"[", b"]", b":", b",", b'"', b"\n", b"\t", b"#", b"&a", b"*a",
                                      b"!!python/object:os.system", b"- ", b"\x00", b"\xff", b"\xc3", b"null", b"-1"])
    return bytes(data)


def snapshot(*folders: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folders` but those in `skip`: (size, modification time in ns)."""
    found = {}
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and skip not in path.parents:
                stat = path.stat()
                found[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def good_files(tiny_model_folder) -> tuple[bytes, bytes]:
    # numbers a corruption could turn into a valid but huge value (batch size, length, accumulation) are left at
    # their defaults, and --max-steps 1 bounds the steps: a case trains for a step at most
    run = {"model": {"source": str(tiny_model_folder), "device": "cpu"},
           "plan": {"targets": "q_proj,v_proj", "rank": 2, "alpha": 4},
           "data": {"train_path": "train.jsonl", "format": "auto"},
           "training": {"save_every": 0, "spectrum_every": 0, "eval_every": 0, "learning_rate": 0.001}}
    rows = (DEMO_DIR / "train.jsonl").read_text().splitlines()[:4]
    return yaml.safe_dump(run).encode(), ("\n".join(rows) + "\n").encode()


@pytest.mark.parametrize("target", ["run file", "data file"])
def test_corrupted_files_train_or_end_in_one_line_and_write_nothing_outside_the_run_folder(
        target, good_files, tiny_model_folder, tmp_path, capfd, monkeypatch):
    rng = random.Random(f"{SEED}-{target}")
    good_run, good_data = good_files
    outcomes: Counter[str] = Counter()
    for case in range(CASES[target]):
        folder = tmp_path / f"case-{case}"
        folder.mkdir()
        run = corrupt(good_run, rng) if target == "run file" else good_run
        data = corrupt(good_data, rng) if target == "data file" else good_data
        (folder / "run.yaml").write_bytes(run)
        (folder / "train.jsonl").write_bytes(data)
        run_dir = folder / "run"
        monkeypatch.chdir(folder)
        before = snapshot(tmp_path, tiny_model_folder, skip=run_dir)
        capfd.readouterr()
        try:
            code = main(["train", "run.yaml", "--run-dir", str(run_dir), "--max-steps", "1"])
        except SystemExit as exit_:
            code = exit_.code
        out, err = capfd.readouterr()
        shown = f"case {case}: {run if target == 'run file' else data!r}\nexit {code}\n{err}"
        assert code in (0, 2), shown
        assert "Traceback" not in err, shown
        if code == 2:
            lines = err.splitlines()
            assert [line for line in lines if line.startswith("lora-studio:")] == lines[-1:], shown
            assert out == "", shown
        assert snapshot(tmp_path, tiny_model_folder, skip=run_dir) == before, shown
        outcomes["trained" if code == 0 else "refused"] += 1
    with capfd.disabled():
        print(f"\nfuzz, {target}: {CASES[target]} cases, {outcomes['trained']} trained, {outcomes['refused']} refused "
              "in one line, 0 tracebacks, 0 files written outside the run folder")
    assert outcomes["refused"] > 0  # the corruptions reach the checks, not only harmless bytes
