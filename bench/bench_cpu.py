"""Training speed on the CPU: the studio's engine beside HF Trainer + PEFT on the built-in demo, in the same run.

The workload a person meets first on a laptop: the built-in model (SmolLM2-135M-Instruct, float32), LoRA r=8 on all
linear layers (the studio's plan, so both sides adapt the same modules with the same dropout), batch 8, the demo's
instruction rows at max_length 96. Both sides train on exactly the same rows in the same order (the engine's own
batches, which HF's Trainer reads sequentially, padded by DataCollatorForSeq2Seq as the engine pads). Each side runs
in its own process, one after the other, alternating, `--repeats` times; a step's time is the interval between two
consecutive optimizer steps, timed by the same hook on both sides (torch's optimizer step post-hook: everything a
step costs, collating, forward, backward, clipping, the optimizer, logging; the engine reports a step's numbers
after it has queued the next, so the times its reports arrive are no clock), its median after `--warmup` steps.
Prints each side's median and best, and the ratio (HF's step time over the engine's: above 1 means the engine is
faster).

    .venv/bin/python bench/bench_cpu.py [--steps 12] [--repeats 3] [--threads N]

About 3 minutes on two free cores. Other processes on the same cores make the timings swing: the ratio of
medians taken in the same run is the number to read, and `--threads` pins both sides to the same thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RANK, ALPHA, MAX_LENGTH, BATCH, LR = 8, 16, 96, 8, 2e-4


def demo_spec():
    import dataclasses

    from studio.core.data.dataset import demo_spec as demo

    return dataclasses.replace(demo(), val_path=None, max_length=MAX_LENGTH)


def engine_side(steps: int) -> list[float]:
    """The engine's losses on the demo (no evaluation, spectra or checkpoints: HF's side has none)."""
    from studio.core import events as ev
    from studio.core.runconfig import ModelConfig, RunConfig, TrainingConfig
    from studio.core.train.engine import train

    spec = demo_spec()
    config = RunConfig(
        model=ModelConfig(source="default", device="cpu", dtype="float32"),
        plan={"targets": "all-linear", "rank": RANK, "alpha": ALPHA},
        data=spec.to_dict(),
        training=TrainingConfig(max_steps=steps, batch_size=BATCH, learning_rate=LR, eval_every=0, eval_examples=0,
                                save_every=0, spectrum_every=0, precision="no"),
        output_dir=tempfile.mkdtemp(prefix="bench-cpu-"),
    )
    losses: list[float] = []

    def on_event(event) -> None:
        if isinstance(event, ev.StepMetrics):
            losses.append(event.loss)

    result = train(config, on_event)
    if isinstance(result, ev.Failed):
        raise SystemExit(f"engine failed: {result.message}")
    return losses


def hf_side(steps: int) -> list[float]:
    """HF Trainer + PEFT's losses on the same model, adapter plan and batches as the engine's."""
    import torch
    from peft import get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from studio.core.data import dataset as datamod
    from studio.core.model import inventory
    from studio.core.model.loading import open_model
    from studio.core.model.plan import LoraPlan, to_peft_config
    from studio.core.train.batching import Batches

    loaded = open_model("default")  # the converted folder the engine reads, the tokenizer
    tree = inventory.build(loaded.model)
    plan = LoraPlan(targets=tuple(inventory.select(tree, "all-linear")), rank=RANK, alpha=ALPHA)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(loaded.folder, dtype=torch.float32)
    peft_model = get_peft_model(model, to_peft_config(plan, tree))
    tokenizer = loaded.tokenizer
    prepared = datamod.prepare(demo_spec(), tokenizer)
    # a "collate" that keeps the rows: the engine's choice of rows for each step, without its tensors
    batches = Batches(prepared.train, lambda rows: {"rows": rows, "input_ids": torch.zeros(0)}, batch_size=BATCH,
                      accumulation=1, world=1, rank=0, seed=0, is_lm=True, lengths=prepared.train.lengths)
    rows = [e for step in range(steps) for e in batches.for_step(step).micro[0]["rows"]]
    features = [{"input_ids": list(e.input_ids), "attention_mask": [1] * len(e.input_ids), "labels": list(e.labels)}
                for e in rows]
    losses: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    class InOrder(Trainer):  # the engine's batches, in the engine's order
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    arguments = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench-cpu-hf-"), per_device_train_batch_size=BATCH, max_steps=steps,
        learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0.05, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
    )
    trainer = InOrder(model=peft_model, args=arguments, train_dataset=features, callbacks=[Losses()],
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    trainer.train()
    return losses


def one_side(side: str, steps: int, threads: int | None) -> None:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    if threads:
        torch.set_num_threads(threads)
    ends: list[float] = []
    register_optimizer_step_post_hook(lambda *args: ends.append(time.perf_counter()))
    losses = (engine_side if side == "engine" else hf_side)(steps)
    print("RESULT " + json.dumps({"side": side, "ends": ends, "losses": losses, "threads": torch.get_num_threads()}))


def run_side(side: str, steps: int, threads: int | None) -> dict:
    command = [sys.executable, __file__, "--side", side, "--steps", str(steps)]
    if threads:
        command += ["--threads", str(threads)]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{side} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def step_times(ends: list[float], warmup: int) -> list[float]:
    return [b - a for a, b in zip(ends[warmup:], ends[warmup + 1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on both sides")
    parser.add_argument("--side", choices=["engine", "hf"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        one_side(args.side, args.steps, args.threads)
        return
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; {args.repeats} x {args.steps} steps "
          f"per side, the first {args.warmup} left out")
    times: dict[str, list[float]] = {"hf": [], "engine": []}
    medians: dict[str, list[float]] = {"hf": [], "engine": []}
    losses: dict[str, list[float]] = {}
    for repeat in range(args.repeats):
        for side in ("hf", "engine") if repeat % 2 == 0 else ("engine", "hf"):
            result = run_side(side, args.steps, args.threads)
            own = step_times(result["ends"], args.warmup)
            times[side] += own
            medians[side].append(statistics.median(own))
            losses[side] = result["losses"]
            print(f"  {side:<6} run {repeat + 1}: median {statistics.median(own):.3f} s a step "
                  f"(best {min(own):.3f} s, {result['threads']} threads)")
    hf, engine = statistics.median(times["hf"]), statistics.median(times["engine"])
    print(f"HF Trainer + PEFT : median {hf:.3f} s a step, best {min(times['hf']):.3f} s")
    print(f"engine            : median {engine:.3f} s a step, best {min(times['engine']):.3f} s")
    print(f"ratio (HF / engine): median {hf / engine:.2f}x, best {min(times['hf']) / min(times['engine']):.2f}x, "
          f"per repeat {', '.join(f'{h / e:.2f}x' for h, e in zip(medians['hf'], medians['engine']))}")
    print(f"first losses, HF: {[round(x, 4) for x in losses['hf'][:4]]}, "
          f"engine: {[round(x, 4) for x in losses['engine'][:4]]}")
    print(json.dumps({"hf_step_s": hf, "engine_step_s": engine, "ratio": hf / engine,
                      "best_ratio": min(times["hf"]) / min(times["engine"])}))


if __name__ == "__main__":
    main()
