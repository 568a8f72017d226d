"""Where a compiled engine step spends its GPU time: torch.profiler over a few steady steps of bench_engine.py's
fixed-length workload (1B Llama shape, r=16 all-linear, 8 × 1024, bf16; `--mode qlora`: its 4-bit NF4 base), kernels
grouped into matmuls, attention, the optimizer and the rest, and how many kernels a step launches: a GPU busy for
much less than the step waits on the host's launches. A tool for finding the next thing to speed up, not a benchmark.

    python bench/profile_engine.py --tokenizer TOKENIZER_DIR [--variant compiled] [--mode lora|qlora] [--steps 16]
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from pathlib import Path

from bench_engine import SHAPE, build_model_folder, run_engine, write_text_data

# first match wins: cuDNN's attention kernels carry "sm90_" in their names like the matmuls
GROUPS = (("attention", ("flash", "fmha", "attention", "sdpa", "cudnn::fusion")),
          ("matmul", ("gemm", "cutlass", "matmul", "sm90_", "nvjet", "cublas")),
          ("optimizer", ("adam", "multi_tensor", "foreach")),
          ("4-bit dequantize", ("dequant",)),
          ("compiled elementwise", ("triton_",)),
          ("copies and casts", ("copy", "cast", "to_copy", "memcpy", "memset", "fill")))


def group_of(name: str) -> str:
    lowered = name.lower()
    return next((group for group, signs in GROUPS if any(sign in lowered for sign in signs)), "other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--variant", default="compiled")
    parser.add_argument("--mode", choices=("lora", "qlora"), default="lora")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--profiled", type=int, default=3, help="steps profiled, the last ones of the run")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from studio.core import events as ev

    work = Path(tempfile.mkdtemp(prefix="profile-engine-"))
    folder, data = work / "model", work / "train.jsonl"
    build_model_folder(args.tokenizer, folder, SHAPE)
    write_text_data(args.tokenizer, data, rows=8 * (args.steps + 2), seq=1024)
    profiler = profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU])
    first = args.steps - args.profiled

    def listener(event) -> None:  # the profiler runs from the end of step `first` to the end of the run
        if isinstance(event, ev.StepMetrics) and event.step == first:
            profiler.__enter__()
        elif isinstance(event, ev.StepMetrics) and event.step == args.steps:
            torch.cuda.synchronize()
            profiler.__exit__(None, None, None)

    summary = run_engine(folder, data, work / "run", args.steps, 1024, 8, args.variant, mode=args.mode,
                         listener=listener)
    print(f"{args.mode}, {args.variant}: {summary['tokens_per_s']:,.0f} tokens/s, "
          f"median step {summary['median_step_s'] * 1e3:.1f} ms")
    averages = profiler.key_averages()
    kernels = [e for e in averages if e.device_type.name == "CUDA" and e.device_time_total > 0]
    total = sum(e.device_time_total for e in kernels)
    grouped: dict[str, float] = defaultdict(float)
    for e in kernels:
        grouped[group_of(e.key)] += e.device_time_total
    # the engine reports a step after queueing the next, so the window holds the kernels of the steps whose
    # optimizer step the host queued inside it
    steps_seen = sum(e.count for e in averages if e.key.startswith("Optimizer.step")) or args.profiled
    per_step = 1e-3 / steps_seen
    launches = sum(e.count for e in kernels) // steps_seen
    print(f"GPU busy {total * per_step:.1f} ms a step, {launches} kernels a step ({steps_seen} steps profiled)")
    for group, us in sorted(grouped.items(), key=lambda kv: -kv[1]):
        print(f"  {group:22s} {us * per_step:7.1f} ms  {us / total:6.1%}")
    print("top kernels (ms a step, calls a step):")
    for e in sorted(kernels, key=lambda e: -e.device_time_total)[:25]:
        print(f"  {e.device_time_total * per_step:7.2f}  {e.count // steps_seen:5d}  {e.key[:110]}")


if __name__ == "__main__":
    main()
