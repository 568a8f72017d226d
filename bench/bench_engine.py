"""Training speed of the studio's engine beside HF Trainer + PEFT, measured in the same run (GPU machine).

Workload of ../shared/bench/hf_peft_baseline.py: a random-init Llama-3.2-1B-shaped model, LoRA r=16 on all
linear layers, sequence 1024, batch 8, bf16, SDPA. Prints tokens/s, peak memory and the ratio against the
baseline for each engine variant, the time compiling took and the run length that repays it, and the memory
estimate beside the measured peak. Variants (--variants, in this order by default):
  plain    the model's own loss, eager layers (fused_loss=false, compile_layers=false: what a CPU run does)
  fused    chunked linear cross-entropy (fused_loss=true), eager layers: what `auto` runs until compiling pays
  compiled chunked loss and torch.compile on each decoder layer (compile_layers=true)

    python bench/bench_engine.py --baseline PATH/hf_peft_baseline.py --tokenizer TOKENIZER_DIR [--steps 30]

TOKENIZER_DIR is any HF tokenizer folder whose ids stay below the model's vocabulary (the built-in model's
converted folder in ~/.cache/lora-studio/gguf/ works). Not a timed test: the numbers only mean something as a
ratio against the baseline printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=True,
             rms_norm_eps=1e-5, rope_theta=500000.0)


def build_model_folder(tokenizer_dir: str, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    for item in Path(tokenizer_dir).iterdir():
        if item.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
            shutil.copy2(item, folder / item.name)


def write_text_data(tokenizer_dir: str, path: Path, rows: int, seq: int) -> None:
    """Documents longer than `seq` tokens, so every example is truncated to exactly `seq` tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rng = random.Random(0)
    words = [w for w in (tokenizer.decode([i]).strip() for i in range(1000, 6000)) if w.isalpha()]
    with path.open("w") as handle:
        for _ in range(rows):
            handle.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(int(seq * 1.5)))}) + "\n")


VARIANTS = {"plain": dict(fused_loss=False, compile_layers=False), "fused": dict(fused_loss=True, compile_layers=False),
            "compiled": dict(fused_loss=True, compile_layers=True)}


def run_engine(folder: Path, data: Path, out: Path, steps: int, seq: int, batch: int, variant: str,
               mode: str = "lora") -> dict:
    import gc
    import time

    import torch

    from studio.core import events as ev
    from studio.core.runconfig import ModelConfig, RunConfig, TrainingConfig
    from studio.core.train.engine import train

    config = RunConfig(
        model=ModelConfig(source=str(folder), device="cuda", dtype="bfloat16",
                          quantization="4bit" if mode == "qlora" else None),
        plan={"targets": "all-linear", "rank": 16, "alpha": 32, "dropout": 0.0},
        data={"train_path": str(data), "format": "text", "max_length": seq},
        training=TrainingConfig(max_steps=steps, batch_size=batch, learning_rate=2e-4, eval_every=0,
                                save_every=0, spectrum_every=0, precision="bf16", **VARIANTS[variant]),
        output_dir=str(out / variant),
    )
    events: list = []
    began = time.perf_counter()
    result = train(config, events.append)
    wall = time.perf_counter() - began
    if isinstance(result, ev.Failed):
        raise SystemExit(f"engine ({variant}) failed: {result.message}")
    for message in (e for e in events if isinstance(e, ev.LogMessage) and e.level != "info"):
        print(f"  [{variant}] {message.level}: {message.text}")
    all_steps = [e for e in events if isinstance(e, ev.StepMetrics)]
    steps_ = all_steps[5:]
    started = next(e for e in events if isinstance(e, ev.RunStarted))
    step_s = [batch * seq / e.tokens_per_s for e in all_steps]
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "variant": variant,
        "tokens_per_s": statistics.median(e.tokens_per_s for e in steps_),
        "best_tokens_per_s": max(e.tokens_per_s for e in steps_),
        "peak_mem_gib": max(e.gpu_mem_bytes for e in steps_) / 2**30,
        "first_step_s": step_s[0],
        "median_step_s": statistics.median(step_s[5:]),
        "run_wall_s": wall,
        "losses": [round(e.loss, 5) for e in all_steps],
        "trainable": started.counts["trainable"],
    }


def estimate_gib(folder: Path, seq: int, batch: int, mode: str = "lora") -> float:
    from studio.core.model import inventory, memory
    from studio.core.model.loading import open_model
    from studio.core.model.plan import LoraPlan, count

    loaded = open_model(str(folder), plan_only=True)
    tree = inventory.build(loaded.model)
    plan = LoraPlan(targets=tuple(inventory.select(tree, "all-linear")), rank=16, alpha=32, dropout=0.0)
    quantization = "4bit" if mode == "qlora" else None
    est = memory.estimate(tree, plan, count(tree, plan), batch_size=batch, seq_len=seq, quantization=quantization)
    return est.allocated / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="path to hf_peft_baseline.py")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--variants", default="plain,fused,compiled", help="comma-separated: " + ", ".join(VARIANTS))
    parser.add_argument("--mode", choices=["lora", "qlora"], default="lora",
                        help="qlora: a 4-bit NF4 base on both sides (the engine does not compile a quantized base)")
    args = parser.parse_args()
    variants = args.variants.split(",")
    if set(variants) - set(VARIANTS):
        parser.error(f"unknown variant(s): {', '.join(sorted(set(variants) - set(VARIANTS)))}")
    work = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    folder, data = work / "model", work / "train.jsonl"
    build_model_folder(args.tokenizer, folder)
    write_text_data(args.tokenizer, data, rows=args.batch * (args.steps + 2), seq=args.seq)

    env = dict(os.environ, SEQ=str(args.seq), BS=str(args.batch), STEPS=str(args.steps), OUT=str(work))
    # The baseline script runs unchanged. `datasets` fingerprints a new Dataset by pickling its Arrow table with
    # dill, which fails on some Python 3.12 + pyarrow builds (MonthDayNano); a random fingerprint skips that
    # hashing, which happens before training and is not part of what is timed.
    launcher = (
        "import runpy, sys, datasets.arrow_dataset as a, datasets.fingerprint as f\n"
        "a.generate_fingerprint = lambda dataset: f.generate_random_fingerprint()\n"
        f"sys.argv = [{args.baseline!r}, {args.mode!r}]\n"
        f"runpy.run_path({args.baseline!r}, run_name='__main__')\n"
    )
    done = subprocess.run([sys.executable, "-c", launcher], env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"baseline failed:\n{done.stderr[-3000:]}")
    baseline = json.loads(lines[-1])
    runs = {v: run_engine(folder, data, work / "runs", args.steps, args.seq, args.batch, v, args.mode)
            for v in variants}
    estimate = estimate_gib(folder, args.seq, args.batch, args.mode)
    print(f"HF Trainer + PEFT        : {baseline['tokens_per_s']:>9,.0f} tokens/s, peak "
          f"{baseline['peak_mem_gib']:.1f} GiB")
    for variant, ours in runs.items():
        ours["ratio"] = ours["tokens_per_s"] / baseline["tokens_per_s"]
        print(f"engine, {variant:<17}: {ours['tokens_per_s']:>9,.0f} tokens/s, peak {ours['peak_mem_gib']:.1f} GiB, "
              f"ratio {ours['ratio']:.2f}x speed, {ours['peak_mem_gib'] / baseline['peak_mem_gib']:.2f}x memory "
              f"(first step {ours['first_step_s']:.1f} s, whole run {ours['run_wall_s']:.0f} s)")
    summary: dict = {"baseline": baseline, "engine": runs, "estimate_gib": estimate}
    if "fused" in runs and "compiled" in runs:
        fused, compiled = runs["fused"], runs["compiled"]
        compile_s = compiled["first_step_s"] - fused["first_step_s"]
        saved = fused["median_step_s"] - compiled["median_step_s"]
        summary.update(compile_s=compile_s, compile_gain=saved / fused["median_step_s"],
                       break_even_steps=compile_s / saved if saved > 0 else None)
        print(f"compiling took {compile_s:.1f} s and saves {saved * 1e3:.1f} ms a step "
              f"({100 * saved / fused['median_step_s']:.1f}%): it pays after "
              + (f"{compile_s / saved:.0f} steps" if saved > 0 else "never"))
    for variant, ours in runs.items():
        print(f"losses, {variant}: {ours['losses'][:6]}")
    # the estimate models the chunked loss without compiled layers (compiling only lowers the peak)
    modelled = runs.get("fused") or max(runs.values(), key=lambda r: r["peak_mem_gib"])
    print(f"memory estimate {estimate:.1f} GiB vs the measured peak of engine, {modelled['variant']}: "
          f"{modelled['peak_mem_gib']:.1f} GiB")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
