"""How fast `prepare()` turns instruction rows into training examples, beside `datasets.map(batched=True)` doing
the same chat template and tokenizer on the same rows, in the same run.

Generates N instruction rows (random words; prompts of 5-120 words, responses of 5-420, so that some pass
max_length 512), writes them as JSONL and times, each in a fresh process (so that each peak memory is its own):
- baseline: `datasets.load_dataset("json")` + `.map(batched=True)` applying the chat template to each batch of
  conversations and the fast tokenizer to the texts (truncated at max_length), as the usual recipes do (no loss
  masks), into a fresh datasets cache;
- prepare, cold: `studio.core.data.dataset.prepare` with an empty data cache (render, tokenize with offsets, loss
  masks, the overflow policy, numpy storage, then writing the cache entry);
- prepare, cached: the same call in a new process, which finds the cache entry (hashing the file and tokenizer).
Each is run --repeat times, taking turns; it prints the best and the median wall-clock seconds, the best CPU
seconds (this process's, tokenizer threads included: on a machine other work shares, the steadier number), the
ratio of the baseline's time to each, each process's peak resident memory and the bytes the prepared tokens take.
The tokenizer is the built-in model's (SmolLM2, ChatML template). The `tokenizers` library encodes on every core
unless TOKENIZERS_PARALLELISM=false; both sides get the same setting.

    .venv/bin/python bench/bench_data.py                 # 20,000 rows
    .venv/bin/python bench/bench_data.py --rows 100000 --repeat 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the a cat dog river runs quickly over lazy fox and then some more words appear here to pad text date "
         "answer question model train token window epoch value result number first second third").split()


def generate(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(rows):
            prompt = " ".join(rng.choices(WORDS, k=rng.randint(5, 120)))
            response = " ".join(rng.choices(WORDS, k=rng.randint(5, 420)))
            handle.write(json.dumps({"prompt": prompt, "response": response}) + "\n")


def tokenizer_folder() -> str:
    from studio.core.model.loading import open_model

    return str(open_model("default").folder)


def run_baseline(data: Path, tokenizer_dir: str, max_length: int, scratch: Path) -> dict:
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    started, cpu = time.perf_counter(), time.process_time()
    table = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(scratch))

    def apply(batch: dict) -> dict:
        conversations = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                         for p, r in zip(batch["prompt"], batch["response"])]
        texts = tokenizer.apply_chat_template(conversations, tokenize=False)
        return tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length)

    mapped = table.map(apply, batched=True, remove_columns=table.column_names)
    return {"seconds": time.perf_counter() - started, "cpu": time.process_time() - cpu, "examples": len(mapped)}


def run_prepare(data: Path, tokenizer_dir: str, max_length: int) -> dict:
    from transformers import AutoTokenizer

    from studio.core.data.dataset import DataSpec, prepare

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    spec = DataSpec(str(data), format="instruction", max_length=max_length)
    started, cpu = time.perf_counter(), time.process_time()
    prepared = prepare(spec, tokenizer)
    return {"seconds": time.perf_counter() - started, "cpu": time.process_time() - cpu,
            "examples": len(prepared.train), "dropped": prepared.dropped,
            "tokens": prepared.train.token_count, "bytes": prepared.train.nbytes, "from_cache": prepared.from_cache}


def worker(args: argparse.Namespace) -> None:
    if args.worker == "baseline":
        result = run_baseline(Path(args.data), args.tokenizer, args.max_length, Path(args.scratch))
    else:
        result = run_prepare(Path(args.data), args.tokenizer, args.max_length)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def measure(kind: str, data: Path, tokenizer: str, max_length: int, scratch: Path, cache: Path) -> dict:
    env = dict(os.environ, LORA_STUDIO_DATA_CACHE=str(cache))
    command = [sys.executable, __file__, "--worker", kind, "--data", str(data), "--tokenizer", tokenizer,
               "--max-length", str(max_length), "--scratch", str(scratch)]
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, taking turns")
    parser.add_argument("--worker", choices=["baseline", "prepare"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    scratch = Path(tempfile.mkdtemp(prefix="bench-data-"))
    data = scratch / "rows.jsonl"
    generate(data, args.rows)
    tokenizer = tokenizer_folder()
    print(f"{args.rows:,} instruction rows ({data.stat().st_size / 1e6:.1f} MB), max_length {args.max_length}; "
          f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores, "
          f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', 'unset')}")
    runs: dict[str, list[dict]] = {"baseline": [], "cold": [], "cached": []}
    for n in range(args.repeat):  # fresh caches for the cold runs; the cached run reads the cold run's entry
        runs["baseline"].append(measure("baseline", data, tokenizer, args.max_length, scratch / f"datasets-{n}",
                                        scratch / f"unused-{n}"))
        runs["cold"].append(measure("prepare", data, tokenizer, args.max_length, scratch, scratch / f"cache-{n}"))
        runs["cached"].append(measure("prepare", data, tokenizer, args.max_length, scratch, scratch / f"cache-{n}"))
    assert not any(r["from_cache"] for r in runs["cold"]) and all(r["from_cache"] for r in runs["cached"])
    base_wall = min(r["seconds"] for r in runs["baseline"])
    base_cpu = min(r["cpu"] for r in runs["baseline"])
    print(f"  {'':<30}{'best s':>8}{'median s':>10}{'CPU s':>8}{'vs baseline':>13}{'(CPU)':>8}{'peak RSS':>10}")
    for label, key in (("datasets.map(batched=True)", "baseline"), ("prepare(), cold", "cold"),
                       ("prepare(), from the cache", "cached")):
        wall = [r["seconds"] for r in runs[key]]
        cpu = min(r["cpu"] for r in runs[key])
        rss = max(r["peak_rss_mb"] for r in runs[key])
        print(f"  {label:<30}{min(wall):>8.2f}{statistics.median(wall):>10.2f}{cpu:>8.2f}"
              f"{base_wall / min(wall):>12.2f}x{base_cpu / cpu:>7.2f}x{rss:>7.0f} MB")
    cold = runs["cold"][0]
    print(f"  prepare(): {cold['examples']:,} examples, {cold['dropped']:,} rows over max_length dropped, "
          f"{cold['tokens']:,} tokens held in {cold['bytes'] / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
