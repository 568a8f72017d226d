"""The `tokenizer.ggml.*` part of a GGUF file, from a transformers tokenizer: tokens, their types, BPE merges,
special token ids, the chat template, and the name llama.cpp knows the pre-tokenizer (the text splitting before
BPE) by. llama.cpp picks its splitting rule by that name alone, so a wrong name tokenizes some text differently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.core.errors import ExportError

# The split rules of Qwen2's and Llama 3's tokenizer.json (they differ in how many digits go together), by the
# names llama.cpp knows them by
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLIT_PRE_TOKENIZERS = {_WORDS + r"\p{N}" + _REST: "qwen2", _WORDS + r"\p{N}{1,3}" + _REST: "llama-bpe"}


@dataclass(frozen=True)
class GgufVocab:
    tokens: list[str]  # by id, one per embedding row
    types: list[int]  # gguf.TokenType values
    merges: list[str]  # "left right", highest priority first
    pre: str  # llama.cpp's name of the pre-tokenizer
    special: dict[str, int | None]  # bos, eos, unk, pad ids
    add_bos: bool  # whether the tokenizer puts BOS in front of a text
    chat_template: str | None
    notes: tuple[str, ...]


def gguf_vocab(tokenizer: Any, n_vocab: int, pre: str | None) -> GgufVocab:
    """The `tokenizer.ggml.*` content of a byte-level BPE (GPT-2 style) tokenizer, padded to the embedding rows."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    if spec.get("model", {}).get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        kind = spec.get("model", {}).get("type") or type(tokenizer).__name__
        raise ExportError(f"GGUF export writes byte-level BPE (GPT-2 style) tokenizers; this one is {kind}")
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(by_id) >= n_vocab:
        raise ExportError(f"the tokenizer has {max(by_id) + 1} tokens but the model only {n_vocab} embeddings")
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for index in range(n_vocab):
        if index not in by_id:  # embedding rows past the tokenizer: llama.cpp needs one token per row
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.CONTROL if added[index].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    notes = []
    if pre is None:
        pre = _pre_tokenizer_name(spec.get("pre_tokenizer") or {})
    if pre is None:
        pre = "default"
        notes.append("llama.cpp has no known match for this tokenizer's pre-tokenizer: it may split some text "
                     "differently (see tokens_agree)")
    first = tokenizer("a").input_ids
    return GgufVocab(
        tokens=tokens,
        types=types,
        merges=[m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])],
        pre=pre,
        special={key: getattr(tokenizer, f"{key}_token_id", None) for key in ("bos", "eos", "unk", "pad")},
        add_bos=tokenizer.bos_token_id is not None and first[:1] == [tokenizer.bos_token_id],
        chat_template=tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
        notes=tuple(notes),
    )


def _pre_tokenizer_name(pre: dict[str, Any]) -> str | None:
    """llama.cpp's name for a pre-tokenizer it knows: GPT-2's split, alone or after single digits, or a known
    regular expression followed by a byte-level step."""
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"  # llama.cpp's name for this split (StarCoder's too)
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        return SPLIT_PRE_TOKENIZERS.get((parts[0].get("pattern") or {}).get("Regex"))
    return None


def source_tokenizer_pre(gguf_path: Path) -> str | None:
    """The pre-tokenizer a GGUF base names (transformers drops it when it converts the file). Scans the header up
    to that key: gguf.GGUFReader would parse every token of the vocabulary first (3 s for the default model)."""
    import struct

    from gguf import GGUFValueType as V

    scalar = {V.UINT8: 1, V.INT8: 1, V.UINT16: 2, V.INT16: 2, V.UINT32: 4, V.INT32: 4, V.FLOAT32: 4, V.BOOL: 1,
              V.UINT64: 8, V.INT64: 8, V.FLOAT64: 8}
    try:
        with open(gguf_path, "rb") as handle:
            def number(fmt: str) -> int:
                return struct.unpack(fmt, handle.read(struct.calcsize(fmt)))[0]

            def text() -> str:
                return handle.read(number("<Q")).decode("utf-8", "replace")

            def skip(kind: V) -> None:
                if kind == V.STRING:
                    handle.seek(number("<Q"), 1)
                elif kind == V.ARRAY:
                    inner, count = V(number("<I")), number("<Q")
                    if inner in scalar:
                        handle.seek(scalar[inner] * count, 1)
                    else:
                        for _ in range(count):
                            skip(inner)
                else:
                    handle.seek(scalar[kind], 1)

            if handle.read(4) != b"GGUF" or number("<I") < 2:
                return None
            number("<Q")  # tensor count
            for _ in range(number("<Q")):
                key, kind = text(), V(number("<I"))
                if key == "tokenizer.ggml.pre" and kind == V.STRING:
                    return text()
                skip(kind)
    except (OSError, ValueError, struct.error):
        return None
    return None
