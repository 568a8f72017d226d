"""Several GPUs against one, in the same run (a machine with two or more GPUs): `lora-studio train --gpus N`.

Workload of bench_engine.py (random-init Llama-3.2-1B shape, LoRA r=16 on all linear layers, 1024 tokens a row,
bf16) through the real CLI, each run a subprocess:
  scaling   1 GPU at batch B against N GPUs at batch B each: tokens/s (median after warm-up) and the ratio
  agreement N GPUs at batch B/N each against 1 GPU at batch B (the same rows every step): the loss step by step
  resume    N GPUs, one process killed with SIGKILL after the first checkpoint, then `resume --gpus N`: the run ends
            at its last step and its losses after the checkpoint agree with an unbroken run's
Both sides of each comparison run the same path (`fused_loss` and `compile_layers` as --variant says, bench_engine's
variants: plain, fused, compiled; the chunked loss runs inside DDP's forward), so the ratio is the GPUs' doing.
Prints a table and one JSON line.

    python bench/bench_multi_gpu.py --tokenizer TOKENIZER_DIR [--gpus 2] [--steps 30] [--variant plain|fused|compiled]

--fsdp runs another part instead: DDP against FSDP (resources/accelerate/fsdp.yaml) on the same N GPUs, batch B each,
the plain path (FSDP sets compiling aside), both sides from one saved initial adapter (PEFT draws LoRA's A matrices
where the base is: on the GPU under DDP, in host memory under FSDP, so fresh runs would start apart):
  tokens/s and each GPU's peak memory (torch.cuda.max_memory_allocated) under each, beside the memory estimate
  (`lora-studio count --gpus N [--fsdp]`, allocated part), and the losses of FSDP against DDP step by step.
The 1B shape's weights are 2.5 GB in bf16 and its activations at 8 × 1024 tokens far more, so FSDP's saving shows
best at a small batch with gradient checkpointing, and on a bigger base (--shape 8b: Llama-3.1-8B's, 16 GB):

    python bench/bench_multi_gpu.py --tokenizer TOKENIZER_DIR --gpus 2 --fsdp --batch 1 --gradient-checkpointing \
        [--shape 8b]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import SHAPE, SHAPE_8B, VARIANTS, build_model_folder, write_text_data  # noqa: E402

SHAPES = {"1b": SHAPE, "8b": SHAPE_8B}


def run_file(work: Path, name: str, model: Path, data: Path, batch: int, steps: int, variant: str,
             adapter: Path | None = None, **training) -> Path:
    settings = dict(max_steps=steps, batch_size=batch, learning_rate=2e-4, warmup_ratio=0.0, schedule="constant",
                    eval_every=0, save_every=0, spectrum_every=0, precision="bf16", seed=3, **VARIANTS[variant])
    settings.update(training)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"source": str(model), "device": "cuda", "dtype": "bfloat16",
                  **({"adapter": str(adapter)} if adapter else {})},
        "plan": {"targets": "all-linear", "rank": 16, "alpha": 32, "dropout": 0.0},
        "data": {"train_path": str(data), "format": "text", "max_length": 1024, "overflow": "truncate"},
        "training": settings, "output_dir": str(work / "runs"),
    }))
    return path


def cli(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "studio.cli", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"lora-studio {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done


def steps_of(run_dir: Path) -> list[dict]:
    """The StepMetrics records of the run as it stands (a resume replaces the steps after its checkpoint)."""
    from studio.core.train.run_folder import latest_history, read_records

    return latest_history(read_records(run_dir))[0]


def summary(run_dir: Path, skip: int = 5) -> dict:
    steps = steps_of(run_dir)
    timed = steps[skip:]
    per_device = [s.get("gpu_mem_per_device") or [s["gpu_mem_bytes"]] for s in timed]
    return {"tokens_per_s": statistics.median(s["tokens_per_s"] for s in timed),
            "peak_gib_per_gpu": [max(d[i] for d in per_device) / 2**30 for i in range(len(per_device[0]))],
            "losses": [s["loss"] for s in steps]}


def kill_and_resume(work: Path, model: Path, data: Path, gpus: int, batch: int, steps: int, variant: str) -> dict:
    path = run_file(work, "resume", model, data, batch, steps, variant, save_every=steps // 3)
    run_dir = work / "runs" / "killed"
    launcher = subprocess.Popen([sys.executable, "-m", "studio.cli", "train", str(path), "--gpus", str(gpus),
                                 "--run-dir", str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = run_dir / "checkpoints" / f"step-{steps // 3}"
    while not first.is_dir() and launcher.poll() is None:
        time.sleep(0.2)
    victim = next(pid for pid in descendants(launcher.pid) if environ(pid).get("RANK") == str(gpus - 1))
    os.kill(victim, signal.SIGKILL)
    _, stderr = launcher.communicate()
    said = stderr.strip().splitlines()[-1]
    cli("resume", str(run_dir), "--gpus", str(gpus))
    return {"killed_with": said, "launcher_exit": launcher.returncode, "steps": [s["step"] for s in steps_of(run_dir)],
            "losses": [s["loss"] for s in steps_of(run_dir)]}


def initial_adapter(model: Path, folder: Path) -> Path:
    """The bench's plan (all-linear, r=16, alpha 32), initialised once on the host and saved as a PEFT adapter."""
    import torch
    from peft import get_peft_model

    from studio.core.adapters.saving import save_adapter
    from studio.core.model import inventory
    from studio.core.model.loading import open_model
    from studio.core.model.plan import LoraPlan, to_peft_config

    loaded = open_model(str(model), device="cpu", dtype="bfloat16")
    tree = inventory.build(loaded.model)
    plan = LoraPlan(targets=tuple(inventory.select(tree, "all-linear")), rank=16, alpha=32, dropout=0.0)
    torch.manual_seed(3)
    return save_adapter(get_peft_model(loaded.model, to_peft_config(plan, tree)), folder, base_model_spec=str(model))


def estimated_gib(model: Path, gpus: int, batch: int, checkpointing: bool, sharded: bool) -> float:
    """The memory estimate's allocated part per GPU (what max_memory_allocated measures: no CUDA context)."""
    from studio.core.model.memory import CUDA_CONTEXT_BYTES

    args = ["count", str(model / "config.json"), "--targets", "all-linear", "--rank", "16", "--alpha", "32",
            "--dropout", "0", "--batch-size", str(batch), "--seq-len", "1024", "--gpus", str(gpus), "--json"]
    args += ["--gradient-checkpointing"] * checkpointing + ["--fsdp"] * sharded
    return (json.loads(cli(*args).stdout)["memory"]["total"] - CUDA_CONTEXT_BYTES) / 2**30


def ddp_against_fsdp(work: Path, model: Path, data: Path, gpus: int, batch: int, steps: int,
                     checkpointing: bool) -> dict:
    adapter = initial_adapter(model, work / "initial-adapter")
    result: dict = {"batch_per_gpu": batch, "gradient_checkpointing": checkpointing}
    for kind in ("ddp", "fsdp"):
        run_dir = work / "runs" / kind
        path = run_file(work, kind, model, data, batch, steps, "plain", adapter=adapter,
                        gradient_checkpointing=checkpointing)
        cli("train", str(path), "--gpus", str(gpus), "--accelerate-config", kind, "--run-dir", str(run_dir))
        result[kind] = summary(run_dir)
        result[kind]["estimate_gib"] = estimated_gib(model, gpus, batch, checkpointing, kind == "fsdp")
        print(f"{kind.upper():>4} on {gpus} GPUs, batch {batch} each{' (checkpointing)' * checkpointing}: "
              f"{result[kind]['tokens_per_s']:,.0f} tokens/s, peak per GPU "
              + ", ".join(f"{g:.2f}" for g in result[kind]["peak_gib_per_gpu"])
              + f" GiB (estimate {result[kind]['estimate_gib']:.2f} GiB allocated)")
    ours, reference = result["fsdp"]["losses"], result["ddp"]["losses"]
    result["loss_max_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(ours, reference))
    result["throughput_ratio"] = result["fsdp"]["tokens_per_s"] / result["ddp"]["tokens_per_s"]
    result["peak_ratio"] = max(result["fsdp"]["peak_gib_per_gpu"]) / max(result["ddp"]["peak_gib_per_gpu"])
    print(f"FSDP against DDP: {result['throughput_ratio']:.2f}x the tokens/s, {result['peak_ratio']:.2f}x the peak "
          f"per GPU; loss over {len(ours)} steps: max relative difference {result['loss_max_rel_diff']:.2e}")
    return result


def descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                if ppid == parent:
                    found.append(int(entry.name))
                    frontier.append(int(entry.name))
    return found


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="plain")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: agreement, resume")
    parser.add_argument("--fsdp", action="store_true", help="only the DDP against FSDP part (see above)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="in the --fsdp part, on both sides")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b", help="the random-init Llama's shape")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    work = Path(tempfile.mkdtemp(prefix="bench-multi-gpu-"))
    model, data = work / "model", work / "train.jsonl"
    build_model_folder(args.tokenizer, model, SHAPES[args.shape])
    write_text_data(args.tokenizer, data, rows=args.batch * args.gpus * (args.steps + 2), seq=1024)
    if args.fsdp:
        fsdp = ddp_against_fsdp(work, model, data, args.gpus, args.batch, args.steps, args.gradient_checkpointing)
        print(json.dumps({"gpus": args.gpus, "shape": args.shape, "fsdp": fsdp}))
        return
    result: dict = {"gpus": args.gpus, "variant": args.variant}

    one = work / "runs" / "one"
    cli("train", str(run_file(work, "one", model, data, args.batch, args.steps, args.variant)), "--run-dir", str(one))
    many = work / "runs" / "many"
    cli("train", str(run_file(work, "many", model, data, args.batch, args.steps, args.variant)),
        "--gpus", str(args.gpus), "--run-dir", str(many))
    result["one"], result["many"] = summary(one), summary(many)
    result["scaling"] = result["many"]["tokens_per_s"] / result["one"]["tokens_per_s"]
    print(f"1 GPU, batch {args.batch}: {result['one']['tokens_per_s']:,.0f} tokens/s, peak "
          f"{result['one']['peak_gib_per_gpu'][0]:.1f} GiB")
    print(f"{args.gpus} GPUs, batch {args.batch} each: {result['many']['tokens_per_s']:,.0f} tokens/s "
          f"({result['scaling']:.2f}x), peak per GPU "
          + ", ".join(f"{g:.1f}" for g in result["many"]["peak_gib_per_gpu"]) + " GiB")

    if "agreement" not in skip:
        split = work / "runs" / "split"
        cli("train", str(run_file(work, "split", model, data, args.batch // args.gpus, 10, args.variant)),
            "--gpus", str(args.gpus), "--run-dir", str(split))
        ours, reference = summary(split, skip=0)["losses"], result["one"]["losses"][:10]
        result["agreement_max_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(ours, reference))
        print(f"loss, {args.gpus} GPUs x batch {args.batch // args.gpus} vs 1 GPU x batch {args.batch}, 10 steps: "
              f"max relative difference {result['agreement_max_rel_diff']:.2e}")
        result["agreement"] = {"many": ours, "one": reference}
    if "resume" not in skip:
        resumed = kill_and_resume(work, model, data, args.gpus, args.batch, args.steps, args.variant)
        tail = resumed["losses"][args.steps // 3:]
        unbroken = result["many"]["losses"][args.steps // 3:]
        resumed["max_rel_diff_after_checkpoint"] = max(abs(a - b) / abs(b) for a, b in zip(tail, unbroken))
        result["resume"] = resumed
        print(f"kill + resume: the launcher said {resumed['killed_with']!r} (exit {resumed['launcher_exit']}); the "
              f"resumed run ended at step {resumed['steps'][-1]}; losses after the checkpoint vs an unbroken run: "
              f"max relative difference {resumed['max_rel_diff_after_checkpoint']:.2e}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
