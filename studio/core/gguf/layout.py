"""What goes in a GGUF file for the llama family, as llama.cpp's own converter lays it out: the hyperparameters
llama.cpp reads (`hparams`), and every tensor with its GGUF name and GGML type (`tensor_plan`, `tensor_array`).

One layout detail matters for the numbers: transformers' llama rotates the two halves of each attention head,
llama.cpp's `llama` architecture rotates adjacent pairs, so the rows of q and k are reordered per head
(`pairs_from_halves`; Qwen2 rotates halves in llama.cpp too, so its rows stay). Llama 3.1/3.2's rope scaling
travels as the `rope_freqs` tensor of per-frequency divisors.
"""

from __future__ import annotations

from typing import Any

from studio.core.errors import ExportError

ROPE_TYPES = ("default", "linear", "llama3")  # transformers' rope_type values the file can carry


def hparams(config: Any, arch: Any) -> dict[str, Any]:
    """The numbers llama.cpp reads, from a transformers config (4.x and 5.x spell the rope settings differently)."""
    import gguf

    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise ExportError(f"GGUF export does not support {rope_type!r} rope scaling yet: only none, linear or "
                          "llama3 (Llama 3.1/3.2's)")
    if rope_type == "llama3" and arch != gguf.MODEL_ARCH.LLAMA:
        raise ExportError(f"GGUF export writes llama3 rope scaling for the llama architecture only, not "
                          f"{gguf.MODEL_ARCH_NAMES[arch]}")
    if getattr(config, "hidden_act", "silu") != "silu":  # llama.cpp's llama and qwen2 graphs use SiLU, always
        raise ExportError(f"GGUF export needs a SiLU feed-forward; this model uses {config.hidden_act}")
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    rope_theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    notes = [f"llama.cpp attends over the whole context; the model was trained with a {window}-token sliding window"] \
        if window and window < config.max_position_embeddings else []
    return {
        "vocab": int(config.vocab_size),
        "context": int(config.max_position_embeddings),
        "embedding": int(config.hidden_size),
        "blocks": int(config.num_hidden_layers),
        "feed_forward": int(config.intermediate_size),
        "heads": heads,
        "kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "head_dim": head_dim,
        "rms_eps": float(config.rms_norm_eps),
        "rope_theta": rope_theta,
        "rope_linear_factor": float(rope["factor"]) if rope_type == "linear" else None,
        "rope_freq_factors": llama3_freq_factors(rope, rope_theta, head_dim, int(config.max_position_embeddings))
        if rope_type == "llama3" else None,
        "notes": notes,
    }


def llama3_freq_factors(rope: dict[str, Any], theta: float, head_dim: int, context: int) -> list[float]:
    """Llama 3.1's rope: what each rotation frequency is divided by. Wavelengths shorter than the original context
    over `high_freq_factor` keep their frequency, those longer than it over `low_freq_factor` are slowed by `factor`,
    and the band between blends the two. llama.cpp reads these divisors from the `rope_freqs` tensor."""
    import math

    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    original = float(rope.get("original_max_position_embeddings") or context)
    divisors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * theta ** (i / head_dim)
        if wavelength < original / high:
            divisors.append(1.0)
        elif wavelength > original / low:
            divisors.append(factor)
        else:  # blend frequency / factor and frequency, weighted by where the wavelength falls in the band
            blend = (original / wavelength - low) / (high - low)
            divisors.append(1 / ((1 - blend) / factor + blend))
    return divisors


def tensor_plan(merged: Any, arch: Any, out_type: str, hparams: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(GGUF name, tensor, GGML type) for every weight to write, in the model's order, then llama3 rope's divisors."""
    import gguf
    import torch
    from gguf import GGMLQuantizationType as Q

    names = gguf.get_tensor_name_map(arch, merged.config.num_hidden_layers)
    embedding, head = merged.get_input_embeddings(), merged.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embedding.weight.data_ptr()
    head_key = next((f"{n}.weight" for n, m in merged.named_modules() if m is head), None) if tied else None
    plan = []
    for key, tensor in merged.state_dict().items():
        if key == head_key:
            continue  # tied: llama.cpp uses token_embd as the output matrix when `output` is absent
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"cannot place {key} in a GGUF file: llama.cpp's {arch.name.lower()} has no such tensor")
        plan.append((name, tensor, ggml_type(out_type, tensor.shape)))
    if hparams["rope_freq_factors"] is not None:
        name = f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS]}.weight"
        plan.append((name, torch.tensor(hparams["rope_freq_factors"], dtype=torch.float32), Q.F32))
    return plan


def ggml_type(out_type: str, shape: Any) -> Any:
    """Vectors (norms, biases) stay float32, as llama.cpp expects; Q8_0 needs rows in blocks of 32, else f16."""
    from gguf import GGMLQuantizationType as Q

    if len(shape) < 2 or out_type == "f32":
        return Q.F32
    if out_type == "q8_0":
        return Q.Q8_0 if shape[-1] % 32 == 0 else Q.F16
    return Q.BF16 if out_type == "bf16" else Q.F16


def tensor_array(name: str, tensor: Any, qtype: Any, arch: Any, hparams: dict[str, Any]) -> Any:
    """The tensor as the bytes GGUF stores: q/k rows reordered for llama's rope, then cast or quantized."""
    import gguf
    import torch
    from gguf import GGMLQuantizationType as Q

    values = tensor.detach().to(torch.float32)
    role = name.split(".")[-2]  # blk.3.attn_q.weight -> attn_q
    if arch == gguf.MODEL_ARCH.LLAMA and role in ("attn_q", "attn_k"):
        heads = hparams["heads"] if role == "attn_q" else hparams["kv_heads"]
        values = pairs_from_halves(values, heads)
    if qtype == Q.F16:
        return values.to(torch.float16).numpy()
    if qtype == Q.BF16:
        return values.to(torch.bfloat16).view(torch.int16).numpy()
    array = values.contiguous().numpy()
    return array if qtype == Q.F32 else gguf.quants.quantize(array, qtype)


def pairs_from_halves(rows: Any, heads: int) -> Any:
    """Within each head, output rows (d_0 … d_h/2-1, d_h/2 … d_h-1) become (d_0, d_h/2, d_1, d_h/2+1, …)."""
    head_dim = rows.shape[0] // heads
    return rows.reshape(heads, 2, head_dim // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)
