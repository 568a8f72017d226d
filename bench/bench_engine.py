"""Training speed of the studio's engine beside HF Trainer + PEFT, each workload measured in the same run (GPU).

Workloads (--workloads, comma-separated; default fixed,varlen,qlora, about 8 minutes on an H200):
  fixed   random-init Llama-3.2-1B shape, LoRA r=16 on all linear layers, 8 × 1024 tokens, bf16, against
          ../shared/bench/hf_peft_baseline.py (`lora`); tokens/s (median after warm-up), peak memory, MFU
  varlen  the same model on variable-length rows (lognormal, median 256 tokens, at most 1000), against
          ../shared/bench/hf_peft_varlen_baseline.py (HF pads each batch of 8): the engine packs the very rows the
          baseline wrote (data.packing, attention auto) and trains one epoch over the first N1 and the first N2 of
          them; real (non-padding) tokens/s as the marginal rate (extra tokens / extra wall seconds), which cancels
          loading and compiling; a warm-up run first fills the compiler's caches, so that both timed runs pay alike
  qlora   the fixed workload on a 4-bit NF4 base (`hf_peft_baseline.py qlora`; bitsandbytes travels as a wheel)
  8b      the fixed workload at the Llama-3-8B shape (hidden 4096, MLP 14336, 32 layers, 32/8 heads, untied), both
          models built on the GPU: the baseline script runs unchanged with its config and model construction
          redirected (initialising 8B on the CPU takes minutes)
  cpu     bench/bench_cpu.py: the built-in demo on this machine's CPU (needs the built-in model's package)
Engine variants (--variants for the fixed-length workloads, default fused,compiled; --varlen-variants, default
compiled): plain (the model's own loss, eager layers), fused (the chunked loss, eager layers: what the memory
estimate models), compiled (the chunked loss and torch.compile on each decoder layer), as the run file's
fused_loss and compile_layers set them; the varlen workload's packed rows train with attention auto.

MFU counts 4N + attention FLOPs per token (N: the matmul parameters, the head included; attention: QKᵀ and PV,
causal, times three for forward and backward) against the GPU's dense bf16 peak (H100 and H200: 989 TFLOP/s).
Prints a table (markdown, for the README) and writes bench/results/engine-DATE-GPU.json with the GPU, the
versions, the date and every figure.

    python bench/bench_engine.py --baselines ../shared/bench --tokenizer TOKENIZER_DIR [--workloads ...]

TOKENIZER_DIR is any HF tokenizer folder whose ids stay below the model's vocabulary (the built-in model's
converted folder in ~/.cache/lora-studio/gguf/ works). Not a timed test: the numbers only mean something as a
ratio against the baseline printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=True,
             rms_norm_eps=1e-5, rope_theta=500000.0)
SHAPE_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=False,
                rms_norm_eps=1e-5, rope_theta=500000.0)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 FLOP/s by the vendor's datasheet
WORKLOADS = ("fixed", "varlen", "qlora", "8b", "cpu")
# each one's training settings; "plain" turns every fast path off, "compiled-separate" all but two: each adapter its
# own product (shared_adapter_input) and transformers' SDPA with its mask check (attention "sdpa")
VARIANTS = {"plain": dict(fused_loss=False, compile_layers=False, shared_adapter_input=False, fused_mlp_kernel=False,
                          attention="sdpa"),
            "fused": dict(fused_loss=True, compile_layers=False),
            "compiled-separate": dict(fused_loss=True, compile_layers=True, shared_adapter_input=False,
                                      attention="sdpa"),
            "compiled-mlp-unfused": dict(fused_loss=True, compile_layers=True, fused_mlp_kernel=False),
            "compiled-unshared": dict(fused_loss=True, compile_layers=True, shared_adapter_input=False,
                                      fused_mlp_kernel=False),
            "compiled": dict(fused_loss=True, compile_layers=True)}


# -- models and data ---------------------------------------------------------------------------------------------------
def copy_tokenizer(tokenizer_dir: str, folder: Path) -> None:
    for item in Path(tokenizer_dir).iterdir():
        if item.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
            shutil.copy2(item, folder / item.name)


def build_model_folder(tokenizer_dir: str, folder: Path, shape: dict | None = None) -> None:
    """A random-init model of `shape` (the 1B one by default) saved in bf16, with the tokenizer beside it."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**(shape or SHAPE)), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    copy_tokenizer(tokenizer_dir, folder)


def loaded_on_gpu(tokenizer_dir: str, folder: Path, shape: dict):
    """A LoadedModel built on the GPU in place (no weights written or read): the 8B shape takes seconds so."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from studio.core.model.loading import LoadedModel, resolve_source

    config = LlamaConfig(**shape)
    config.save_pretrained(folder)
    copy_tokenizer(tokenizer_dir, folder)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return LoadedModel(model, AutoTokenizer.from_pretrained(folder), resolve_source(str(folder)), "causal-lm", False,
                       "bfloat16", "cuda", None, str(folder))


def write_text_data(tokenizer_dir: str, path: Path, rows: int, seq: int) -> None:
    """Documents longer than `seq` tokens, so every example is truncated to exactly `seq` tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rng = random.Random(0)
    words = [w for w in (tokenizer.decode([i]).strip() for i in range(1000, 6000)) if w.isalpha()]
    with path.open("w") as handle:
        for _ in range(rows):
            handle.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(int(seq * 1.5)))}) + "\n")


# -- FLOPs -------------------------------------------------------------------------------------------------------------
def matmul_params(shape: dict) -> int:
    h, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + shape["vocab_size"] * h


def flops_per_token(shape: dict, seq: int) -> float:
    """Forward 2N, backward 2N (the frozen weights get no gradient), attention's two causal matmuls three times."""
    attention = 2 * 2 * shape["num_hidden_layers"] * seq * shape["hidden_size"] / 2
    return 4 * matmul_params(shape) + 3 * attention


def mfu(tokens_per_s: float, shape: dict, seq: int, peak: float | None) -> float | None:
    return tokens_per_s * flops_per_token(shape, seq) / peak if peak else None


def json_or_none(line: str):
    """The JSON value on `line`, or None: HF Trainer prints its summary as a Python dict, which is not JSON."""
    try:
        return json.loads(line)
    except ValueError:
        return None


# -- the baselines -----------------------------------------------------------------------------------------------------
def launch_baseline(script: str, argv: list[str], env: dict, shape: dict | None = None,
                    device: str = "cuda") -> list[dict]:
    """Run a baseline script unchanged in a subprocess; its JSON lines. `datasets` fingerprints a new Dataset by
    pickling its Arrow table with dill, which fails on some Python 3.12 + pyarrow builds (MonthDayNano): a random
    fingerprint skips that hashing, which happens before training and is not timed. With `shape`, the script's
    LlamaConfig takes that shape and its models are built on `device` (initialising 8B on the CPU takes minutes)."""
    patch = ""
    if shape is not None:
        patch = (
            "import torch, transformers\n"
            "_config, _auto = transformers.LlamaConfig, transformers.AutoModelForCausalLM\n"
            f"transformers.LlamaConfig = lambda **kw: _config(**{{**kw, **{shape!r}}})\n"
            "class _OnGpu(_auto):\n"
            "    @classmethod\n"
            "    def from_config(cls, *a, **k):\n"
            f"        with torch.device({device!r}):\n"
            "            return _auto.from_config(*a, **k)\n"
            "transformers.AutoModelForCausalLM = _OnGpu\n"
        )
    launcher = (
        "import runpy, sys, datasets.arrow_dataset as a, datasets.fingerprint as f\n"
        "a.generate_fingerprint = lambda dataset: f.generate_random_fingerprint()\n"
        f"{patch}"
        f"sys.argv = [{script!r}, *{argv!r}]\n"
        f"runpy.run_path({script!r}, run_name='__main__')\n"
    )
    done = subprocess.run([sys.executable, "-c", launcher], env=dict(os.environ, **env), capture_output=True, text=True)
    lines = [record for record in map(json_or_none, done.stdout.splitlines()) if isinstance(record, dict)]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"baseline {Path(script).name} {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return lines


# -- the engine --------------------------------------------------------------------------------------------------------
def run_engine(folder: Path, data: Path, out: Path, steps: int, seq: int, batch: int, variant: str,
               mode: str = "lora", loaded=None, listener=None, **training) -> dict:
    """One engine run; its step metrics summarised. `training`: more TrainingConfig fields, and `data_settings`
    for more data fields. `listener`, if given, sees every event as it comes (bench/profile_engine.py)."""
    import torch

    from studio.core import events as ev
    from studio.core.runconfig import ModelConfig, RunConfig, TrainingConfig
    from studio.core.train.engine import train

    data_settings = training.pop("data_settings", {})
    settings = dict(max_steps=steps, batch_size=batch, learning_rate=2e-4, eval_every=0, save_every=0,
                    spectrum_every=0, precision="bf16", **VARIANTS[variant])
    settings.update(training)
    config = RunConfig(
        model=ModelConfig(source=str(folder), device="cuda", dtype="bfloat16",
                          quantization="4bit" if mode == "qlora" else None),
        plan={"targets": "all-linear", "rank": 16, "alpha": 32, "dropout": 0.0},
        # truncate: every fixed-length row exactly `seq` tokens, as the baseline's (windows would add short rows)
        data={"train_path": str(data), "format": "text", "max_length": seq, "overflow": "truncate", **data_settings},
        training=TrainingConfig(**settings),
        output_dir=str(out),
    )
    events: list = []

    def on_event(event) -> None:
        events.append(event)
        if listener is not None:
            listener(event)

    torch.cuda.synchronize()
    began = time.perf_counter()
    result = train(config, on_event, loaded=loaded)
    torch.cuda.synchronize()
    wall = time.perf_counter() - began
    if isinstance(result, ev.Failed):
        raise SystemExit(f"engine ({variant}) failed: {result.message}")
    logs = [f"{e.level}: {e.text}" for e in events if isinstance(e, ev.LogMessage)
            and (e.level != "info" or e.text.startswith(("attention", "compiling", "gated MLPs")))]
    all_steps = [e for e in events if isinstance(e, ev.StepMetrics)]
    steady = all_steps[5:] or all_steps
    step_s = [(b.elapsed_s - a.elapsed_s) for a, b in zip([None, *all_steps], all_steps) if a is not None]
    events.clear()
    del result
    release()
    return {
        "variant": variant,
        "tokens_per_s": statistics.median(e.tokens_per_s for e in steady),
        "peak_mem_gib": max(e.gpu_mem_bytes or 0 for e in steady) / 2**30,
        # the whole run's, its first (eager) steps included: what the memory estimate answers for
        "run_peak_gib": max(e.gpu_mem_bytes or 0 for e in all_steps) / 2**30,
        "first_step_s": all_steps[0].elapsed_s,
        "median_step_s": statistics.median(step_s[4:] or step_s or [all_steps[0].elapsed_s]),
        "run_wall_s": wall,
        "real_tokens": all_steps[-1].tokens_seen,
        "steps": len(all_steps),
        "token_efficiency": statistics.mean(e.token_efficiency for e in all_steps if e.token_efficiency),
        "losses": [round(e.loss, 5) for e in all_steps],
        "log": logs,
    }


def release() -> None:
    """The last run's model and optimizer gone from the GPU before the next one starts."""
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()


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


def epoch_steps(data: Path, tokenizer_dir: Path, seq: int, batch: int) -> int:
    """Optimizer steps of one epoch over `data` packed to `seq`, as the engine will cut it."""
    from transformers import AutoTokenizer

    from studio.core.data import dataset as datamod

    spec = datamod.DataSpec.from_dict({"train_path": str(data), "format": "text", "max_length": seq, "packing": True})
    return max(1, len(datamod.prepare(spec, AutoTokenizer.from_pretrained(tokenizer_dir)).train) // batch)


# -- workloads ---------------------------------------------------------------------------------------------------------
def fixed_workload(args, work: Path, folder: Path, data: Path, baseline: dict, mode: str, shape: dict,
                   loaded_factory=None) -> dict:
    peak = gpu_peak()
    runs = {}
    for variant in args.variants:
        loaded = loaded_factory() if loaded_factory else None
        runs[variant] = run_engine(folder, data, work / "runs" / f"{mode}-{variant}", args.steps, args.seq, args.batch,
                                   variant, mode, loaded=loaded)
        runs[variant]["ratio"] = runs[variant]["tokens_per_s"] / baseline["tokens_per_s"]
        runs[variant]["mfu"] = mfu(runs[variant]["tokens_per_s"], shape, args.seq, peak)
        del loaded
        release()
    baseline["mfu"] = mfu(baseline["tokens_per_s"], shape, args.seq, peak)
    modelled = runs.get("fused") or runs.get("compiled") or next(iter(runs.values()))
    estimate = estimate_gib(folder, args.seq, args.batch, mode)
    return {"baseline": baseline, "engine": runs, "estimate_gib": estimate,
            "estimate_vs": {"variant": modelled["variant"], "run_peak_gib": modelled["run_peak_gib"]}}


def varlen_workload(args, work: Path, folder: Path) -> dict:
    out = work / "varlen"
    baseline = launch_baseline(str(Path(args.baselines) / "hf_peft_varlen_baseline.py"),
                               [str(folder), str(out), str(args.rows[0]), str(args.rows[1])], {})[-1]
    rows = (out / "rows.jsonl").read_text().splitlines(keepends=True)
    parts = {}
    for n in (*args.rows, "warm"):
        parts[n] = out / f"rows-{n}.jsonl"
        parts[n].write_text("".join(rows[:args.rows[0] if n == "warm" else n]))
    engine = {}
    for variant in args.varlen_variants:
        settings = dict(data_settings={"packing": True})
        # the warm-up: the compiler's caches filled for the row widths the timed runs meet
        run_engine(folder, parts["warm"], work / "runs" / f"varlen-warm-{variant}", 8, 1024, args.batch, variant,
                   **settings)
        timed = [run_engine(folder, parts[n], work / "runs" / f"varlen-{n}-{variant}",
                            epoch_steps(parts[n], folder, 1024, args.batch), 1024, args.batch, variant, **settings)
                 for n in args.rows]
        (small, large) = timed
        marginal = (large["real_tokens"] - small["real_tokens"]) / (large["run_wall_s"] - small["run_wall_s"])
        engine[variant] = {"marginal_real_tokens_per_s": marginal, "real_tokens": [r["real_tokens"] for r in timed],
                           "wall_s": [r["run_wall_s"] for r in timed], "steps": [r["steps"] for r in timed],
                           "steady_real_tokens_per_s": large["tokens_per_s"],
                           "token_efficiency": large["token_efficiency"], "peak_mem_gib": large["peak_mem_gib"],
                           "ratio": marginal / baseline["marginal_real_tokens_per_s"], "log": large["log"]}
    return {"baseline": baseline, "engine": engine}


def cpu_workload() -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_cpu.py"), "--repeats", "2"],
                          capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"bench_cpu.py failed:\n{done.stderr[-3000:]}")
    print("\n".join(line for line in done.stdout.splitlines() if not line.startswith("{")))
    return json.loads(lines[-1])


# -- report ------------------------------------------------------------------------------------------------------------
def gpu_peak() -> float | None:
    import torch

    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def versions() -> dict:
    import importlib.metadata as md

    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "triton"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    # "-dirty" when the tree differs from that commit (a copy of the tree over an older clone, as on a GPU machine)
    commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True, text=True,
                            cwd=ROOT)
    found["studio_commit"] = commit.stdout.strip() or None
    return found


def percent(value: float | None) -> str:
    return f"{100 * value:.1f}%" if value is not None else "n/a"


def table(results: dict) -> str:
    lines = ["| workload | HF Trainer + PEFT | engine | ratio |", "|---|---|---|---|"]
    for key, label in (("fixed", "1B shape, fixed 8 × 1024"), ("qlora", "1B shape, QLoRA NF4, 8 × 1024"),
                       ("8b", "Llama-3-8B shape, fixed 8 × 1024")):
        if key not in results:
            continue
        base = results[key]["baseline"]
        for variant, ours in results[key]["engine"].items():
            lines.append(f"| {label} ({variant}) | {base['tokens_per_s']:,.0f} tokens/s, "
                         f"{base['peak_mem_gib']:.1f} GiB, {percent(base['mfu'])} MFU | "
                         f"{ours['tokens_per_s']:,.0f}, {ours['peak_mem_gib']:.1f} GiB, "
                         f"{percent(ours['mfu'])} MFU | {ours['ratio']:.2f}x |")
    if "varlen" in results:
        base = results["varlen"]["baseline"]
        for variant, ours in results["varlen"]["engine"].items():
            lines.append(f"| 1B shape, variable length, one epoch, real tokens/s (packed, {variant}) | "
                         f"{base['marginal_real_tokens_per_s']:,.0f} | {ours['marginal_real_tokens_per_s']:,.0f} "
                         f"({percent(ours['token_efficiency'])} of positions real) | {ours['ratio']:.2f}x |")
    for key in ("fixed", "qlora"):
        if key in results:
            shown = results[key]["estimate_vs"]
            lines.append(f"| memory estimate vs the run's peak, {key} ({shown['variant']}) | | "
                         f"{results[key]['estimate_gib']:.1f} vs {shown['run_peak_gib']:.1f} GiB | "
                         f"{results[key]['estimate_gib'] / shown['run_peak_gib']:.2f} |")
    if "cpu" in results:
        cpu = results["cpu"]
        lines.append(f"| CPU demo (SmolLM2-135M, r=8, batch 8), s a step | {cpu['hf_step_s']:.2f} | "
                     f"{cpu['engine_step_s']:.2f} | {cpu['ratio']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baselines", required=True, help="the folder of hf_peft_baseline.py and "
                        "hf_peft_varlen_baseline.py (../shared/bench)")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--workloads", default="fixed,varlen,qlora", help="comma-separated: " + ", ".join(WORKLOADS))
    parser.add_argument("--variants", default="fused,compiled", help="for the fixed-length workloads, comma-separated: "
                        + ", ".join(VARIANTS) + " (the memory estimate models fused: eager layers)")
    parser.add_argument("--varlen-variants", default="compiled", help="for the variable-length workload")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rows", type=int, nargs=2, default=(480, 1440), metavar=("N1", "N2"),
                        help="varlen: the two prefixes of the rows timed (the marginal rate is between them)")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    workloads = args.workloads.split(",")
    args.variants, args.varlen_variants = args.variants.split(","), args.varlen_variants.split(",")
    for given, known, what in ((workloads, WORKLOADS, "workload"), (args.variants, VARIANTS, "variant"),
                               (args.varlen_variants, VARIANTS, "variant")):
        if set(given) - set(known):
            parser.error(f"unknown {what}(s): {', '.join(sorted(set(given) - set(known)))}")

    import torch

    began = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    folder, data = work / "model", work / "train.jsonl"
    results: dict = {}
    gpu_work = [w for w in workloads if w != "cpu"]
    if gpu_work:
        build_model_folder(args.tokenizer, folder)
        write_text_data(args.tokenizer, data, rows=args.batch * (args.steps + 2), seq=args.seq)
    env = dict(SEQ=str(args.seq), BS=str(args.batch), STEPS=str(args.steps), OUT=str(work))
    modes = [mode for workload, mode in (("fixed", "lora"), ("qlora", "qlora")) if workload in workloads]
    baselines = {}
    if modes:
        baselines = {line["mode"]: line for line in launch_baseline(
            str(Path(args.baselines) / "hf_peft_baseline.py"), modes, env)}
    for workload in workloads:
        started = time.perf_counter()
        if workload in ("fixed", "qlora"):
            mode = "lora" if workload == "fixed" else "qlora"
            results[workload] = fixed_workload(args, work, folder, data, baselines[mode], mode, SHAPE)
        elif workload == "varlen":
            results[workload] = varlen_workload(args, work, folder)
        elif workload == "8b":
            base = launch_baseline(str(Path(args.baselines) / "hf_peft_baseline.py"), ["lora"], env, SHAPE_8B)[-1]
            big = work / "model-8b"
            big.mkdir()
            results[workload] = fixed_workload(args, work, big, data, base, "lora", SHAPE_8B,
                                               lambda: loaded_on_gpu(args.tokenizer, big, SHAPE_8B))
        else:
            results[workload] = cpu_workload()
        print(f"[{workload}: {time.perf_counter() - started:.0f} s]", flush=True)

    report = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "date": datetime.now().isoformat(timespec="seconds"), "versions": versions(),
              "settings": {"steps": args.steps, "seq": args.seq, "batch": args.batch, "rows": list(args.rows),
                           "variants": args.variants, "varlen_variants": args.varlen_variants}, "results": results,
              "wall_s": time.perf_counter() - began}
    for workload, result in results.items():
        for variant, ours in (result.get("engine") or {}).items():
            for line in ours.get("log", []):
                print(f"  [{workload}, {variant}] {line}")
            if "losses" in ours:
                print(f"  [{workload}, {variant}] first losses {ours['losses'][:4]}")
    print(table(results))
    target = Path(args.results)
    target.mkdir(parents=True, exist_ok=True)
    gpu = (report["gpu"] or "cpu").replace(" ", "-")
    path = target / f"engine-{datetime.now():%Y%m%d-%H%M%S}-{gpu}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"results: {path} ({report['wall_s']:.0f} s in all)")


if __name__ == "__main__":
    main()
