"""What the host does in a compiled engine step: graph breaks and recompiles (Dynamo's counters), host-device syncs
(torch's sync debug mode, each with where it came from) and a cProfile of steady steps, for bench_engine.py's fixed
workload (1B Llama shape, r=16 all-linear, 8 × 1024, bf16) in each `mode:variant` given. For telling a step that
waits on the host from one that waits on the GPU (bench/profile_engine.py gives the GPU's side); not a benchmark.

    python bench/diagnose_host.py --tokenizer TOKENIZER_DIR [qlora:compiled lora:compiled ...]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

from bench_engine import SHAPE, build_model_folder, run_engine, write_text_data

STEPS, FIRST, LAST = 20, 12, 18  # steps run; the host is watched from the end of FIRST to the end of LAST


def sync_recorder(syncs: Counter):
    """A warnings.showwarning that counts the sync debug mode's warnings by the Python frames that caused them."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" in str(message):
            frames = [f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in traceback.extract_stack()[:-2]
                      if "warnings" not in f.filename][-5:]
            syncs[" <- ".join(reversed(frames))] += 1
    return show


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("runs", nargs="*", default=["qlora:compiled", "lora:compiled"], help="mode:variant ...")
    args = parser.parse_args()

    import torch
    from torch._dynamo.utils import counters

    from studio.core import events as ev

    work = Path(tempfile.mkdtemp(prefix="diagnose-host-"))
    folder, data = work / "model", work / "train.jsonl"
    build_model_folder(args.tokenizer, folder, SHAPE)
    write_text_data(args.tokenizer, data, rows=8 * (STEPS + 4), seq=1024)
    for run in args.runs:
        mode, variant = run.split(":")
        counters.clear()
        profiler, syncs, stamps = cProfile.Profile(), Counter(), {}

        def listener(event) -> None:
            if not isinstance(event, ev.StepMetrics):
                return
            stamps[event.step] = time.perf_counter()
            if event.step == FIRST:
                torch.cuda.set_sync_debug_mode("warn")
                warnings.showwarning = sync_recorder(syncs)
                warnings.simplefilter("always")
                profiler.enable()
            elif event.step == LAST:
                profiler.disable()
                torch.cuda.set_sync_debug_mode("default")

        summary = run_engine(folder, data, work / f"run-{mode}-{variant}", STEPS, 1024, 8, variant, mode=mode,
                             listener=listener)
        watched = LAST - FIRST
        print(f"=== {mode}, {variant}: {summary['tokens_per_s']:,.0f} tokens/s, median step "
              f"{summary['median_step_s'] * 1e3:.1f} ms; the {watched} watched steps "
              f"{(stamps[LAST] - stamps[FIRST]) / watched * 1e3:.1f} ms a step (under cProfile)")
        print("graph breaks:", dict(counters["graph_break"]), " stats:", dict(counters["stats"]),
              " recompiles:", dict(counters["recompiles"]))
        print(f"syncs in {watched} steps:", sum(syncs.values()))
        for where, count in syncs.most_common(8):
            print(f"  {count:5d}  {where}")
        for order, lines in (("tottime", 30), ("cumulative", 30)):
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(lines)
            print(text.getvalue().strip())


if __name__ == "__main__":
    main()
