"""An Ollama Modelfile for an exported GGUF file: `ollama create NAME -f Modelfile` in its folder.

A TEMPLATE is written only where it is known to be right: the model's own chat template must render ChatML
(checked by rendering it), and the Go template below renders the same text for the same chat once Ollama has put
the SYSTEM line first (checked against Go's text/template when it was written).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from studio.core.errors import WriteError
from studio.core.files import output_file, studio_wrote

MODELFILE = "Modelfile"
CHATML_STOPS = ("<|im_start|>", "<|im_end|>")


def write_modelfile(target: Path, tokenizer: Any) -> Path:
    """Write the Modelfile for the GGUF file `target` beside it (at `modelfile_path`), atomically."""
    path = modelfile_path(target)
    with output_file(path, "Modelfile") as staging:
        staging.write_text(modelfile_text(target.name, tokenizer), encoding="utf-8")
    return path


def modelfile_path(target: Path) -> Path:
    """`Modelfile` beside the GGUF file `target`, unless that name holds a person's file or the studio's Modelfile
    of another GGUF file: then `<name>.Modelfile`. Neither is ever replaced; WriteError when both are taken."""
    candidates = (target.with_name(MODELFILE), target.with_name(f"{target.stem}.{MODELFILE}"))
    for path in candidates:
        if not path.exists() and not path.is_symlink():
            return path
        text = path.read_text(encoding="utf-8", errors="replace") if studio_wrote(path) else ""
        if text.startswith(f"FROM ./{target.name}\n"):
            return path
    raise WriteError(f"cannot write a Modelfile beside {target}: {candidates[0].name} and {candidates[1].name} there "
                     "are not the studio's for this file; move one of them away")


def modelfile_text(gguf_name: str, tokenizer: Any) -> str:
    """An Ollama Modelfile for the file: a TEMPLATE only where the chat format is ChatML, which is checked by
    rendering the model's own chat template; otherwise a pointer to add one."""
    lines = [f"FROM ./{gguf_name}", ""]
    system = _chatml_default_system(tokenizer)
    if system is False:
        lines += ["# No TEMPLATE: this model's chat format could not be turned into an Ollama template here.",
                  "# Ollama may recognize the chat template stored in the GGUF file; if chats look wrong, add a",
                  "# TEMPLATE (https://github.com/ollama/ollama/blob/main/docs/modelfile.md#template)."]
        stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    else:
        if system:
            lines.append(f'SYSTEM """{system}"""')
        lines.append(f'TEMPLATE """{CHATML_GO_TEMPLATE}"""')
        stops = list(CHATML_STOPS)
    lines += [f'PARAMETER stop "{stop}"' for stop in stops if '"' not in stop]
    return "\n".join(lines) + "\n"


# ChatML in Ollama's Go template language: every message closed, then an open assistant turn unless the last
# message is the assistant's own (which it continues). Ollama puts the SYSTEM line first when a chat has none.
CHATML_GO_TEMPLATE = (
    "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
    "<|im_start|>{{ .Role }}\n{{ .Content }}"
    "{{ if or (ne .Role \"assistant\") (not $last) }}<|im_end|>\n{{ end }}"
    "{{ if and $last (ne .Role \"assistant\") }}<|im_start|>assistant\n{{ end }}"
    "{{ end }}"
)


def _chatml_default_system(tokenizer: Any) -> str | None | Literal[False]:
    """False when the chat template is not ChatML; else the system prompt it adds when a chat has none (or None)."""
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        return False

    def chatml(messages: list[dict[str, str]]) -> str:
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)

    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]
    user = [{"role": "user", "content": "U"}]
    opening = "<|im_start|>assistant\n"
    try:
        full = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        bare = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - jinja raises its own types
        return False
    if full != chatml(chat) + opening or not bare.endswith(chatml(user) + opening):
        return False
    head = bare[: -len(chatml(user) + opening)]
    if not head:
        return None
    prefix, suffix = "<|im_start|>system\n", "<|im_end|>\n"
    inner = head[len(prefix): -len(suffix)]
    if head.startswith(prefix) and head.endswith(suffix) and suffix not in inner and '"""' not in inner:
        return inner
    return False
