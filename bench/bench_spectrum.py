"""Benchmark: spectra of every LoRA module (batched QR) against the naive dense way (form ΔW, svdvals).

Builds the default model (SmolLM2-135M, or a random tiny Llama with --tiny), wraps it with all-linear LoRA at
each rank with random A and B (so every singular value is non-zero), and times in the same run: the studio's
batched method, the same QR method as a loop of per-module calls, and the dense baseline.

    .venv/bin/python bench/bench_spectrum.py [--tiny | --random] [--ranks 8 16 64] [--runs 9] [--dense-runs 3]
                                             [--threads N] [--device cuda]

--random builds SmolLM2-135M's architecture with random weights, for a machine without the built-in model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Callable

import torch


def build_model(kind: str) -> Any:
    if kind == "default":
        from studio.core.model.loading import open_model

        return open_model("default").model
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    if kind == "tiny":
        config = LlamaConfig(
            hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512,
        )
    else:  # SmolLM2-135M's shapes
        config = LlamaConfig(
            hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
        )
    return AutoModelForCausalLM.from_config(config)


def dense_spectra(peft_model: Any) -> dict[str, torch.Tensor]:
    """The baseline: PEFT's dense ΔW for each module, then torch.linalg.svdvals of it."""
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        return {
            name: torch.linalg.svdvals(layer.get_delta_weight("default").float())
            for name, layer in peft_model.get_base_model().named_modules()
            if isinstance(layer, LoraLayer)
        }


def looped_qr_spectra(peft_model: Any) -> list[torch.Tensor]:
    """The same QR method without batching: three small linalg calls per module."""
    from peft.tuners.lora import LoraLayer

    out = []
    with torch.no_grad():
        for layer in peft_model.get_base_model().modules():
            if isinstance(layer, LoraLayer):
                a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
                core = torch.linalg.qr(b, mode="r").R @ torch.linalg.qr(a.T, mode="r").R.T
                out.append(torch.linalg.svdvals(core) * abs(layer.scaling["default"]))
    return out


def largest_difference(spectra: Any, dense: dict[str, torch.Tensor]) -> float:
    """The largest gap between the two methods' values, as a share of each module's top value."""
    worst = 0.0
    for s in spectra:
        reference = dense[s.name].cpu()
        gap = (torch.tensor(s.values) - reference[: len(s.values)]).abs().max().item()
        worst = max(worst, gap / reference[0].item())
    return worst


def timed_ms(work: Callable[[], Any], runs: int) -> tuple[float, float]:
    """(median, best) wall time in ms. On a busy machine the best run is the better guess of an idle one."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000, min(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_kind = parser.add_mutually_exclusive_group()
    model_kind.add_argument("--tiny", action="store_true", help="a random tiny Llama instead of SmolLM2-135M")
    model_kind.add_argument("--random", action="store_true", help="SmolLM2-135M's shapes with random weights")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--runs", type=int, default=9, help="timed runs of the QR method (median reported)")
    parser.add_argument("--dense-runs", type=int, default=3, help="timed runs of the dense baseline")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="where the model and the computation live")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from peft import LoraConfig, get_peft_model

    from studio.core.adapters.spectrum import compute_spectra

    model = build_model("tiny" if args.tiny else "random" if args.random else "default").to(args.device)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch {torch.__version__} on {args.device}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {load}")
    for rank in args.ranks:
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False)
        peft_model = get_peft_model(model, config)
        fast = compute_spectra(peft_model)  # warm-up, and the values to check against the baseline
        dense = dense_spectra(peft_model)
        worst = largest_difference(fast, dense)
        fast_ms, fast_best = timed_ms(lambda: compute_spectra(peft_model), args.runs)
        looped_ms, looped_best = timed_ms(lambda: looped_qr_spectra(peft_model), args.runs)
        dense_ms, dense_best = timed_ms(lambda: dense_spectra(peft_model), args.dense_runs)
        print(
            f"r={rank:<3} {len(fast)} modules: spectrum (QR) {fast_ms:.1f} ms vs dense svdvals {dense_ms:.0f} ms: "
            f"{dense_ms / fast_ms:.0f}x faster (medians; best runs {fast_best:.1f} / {dense_best:.0f} ms); "
            f"unbatched QR loop {looped_ms:.1f} ms (best {looped_best:.1f}); "
            f"largest difference to dense {worst:.1e} of the top value"
        )
        model = peft_model.unload()


if __name__ == "__main__":
    main()
