"""The playground: one prompt, two greedy answers side by side, from the base model and from the base with the
adapter (the run that just ended, or one loaded from the Adapter menu).

Both come from one private copy of the open model wrapped with the adapter: the base answer is generated with
the adapter switched off (PEFT's `disable_adapter`), so the two differ by the adapter alone. The copy is made
once per adapter, and everything runs off the UI thread.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, Slot
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from studio.core.data.formats import prompt_inputs
from studio.core.model.loading import LoadedModel
from studio.ui.worker import BackgroundJob, Report, WorkFailed

DEFAULT_PROMPT = "Write this date in ISO format (YYYY-MM-DD): 7 June 1975"
DEFAULT_NEW_TOKENS = 24
ERROR_STYLE = "color: #b3261e; font-weight: bold;"
NOT_READY = "Open a model with weights and train a run (or load an adapter) to compare the two"


@dataclass(frozen=True)
class Answers:
    prompt: str
    base: str
    adapted: str


class AdaptedModel:
    """A private copy of the open model carrying one adapter; lives on the playground's job thread."""

    def __init__(self, base: LoadedModel, adapter_dir: Path) -> None:
        from studio.core.adapters.loading import load_adapter

        self.adapter_dir = adapter_dir
        self.tokenizer = base.tokenizer
        self.model = load_adapter(replace(base, model=copy.deepcopy(base.model)), adapter_dir)
        self.model.eval()

    def answers(self, prompt: str, max_new_tokens: int) -> Answers:
        import torch

        ids = prompt_inputs(self.tokenizer, prompt)["input_ids"].to(self.model.device)
        with torch.inference_mode():
            with self.model.disable_adapter():
                base = self._generate(ids, max_new_tokens)
            adapted = self._generate(ids, max_new_tokens)
        return Answers(prompt, base, adapted)

    def _generate(self, ids: Any, max_new_tokens: int) -> str:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        out = self.model.generate(input_ids=ids, attention_mask=ids.new_ones(ids.shape), do_sample=False,
                                  max_new_tokens=max_new_tokens, pad_token_id=pad)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


class Playground(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._base: LoadedModel | None = None
        self._adapter_dir: Path | None = None
        self._adapted: AdaptedModel | None = None  # touched only by the job thread while a job runs
        self._job: BackgroundJob | None = None
        self.last_answers: Answers | None = None
        self.prompt_edit = QPlainTextEdit(DEFAULT_PROMPT)
        self.prompt_edit.setMaximumHeight(90)
        self.new_tokens = QSpinBox()
        self.new_tokens.setRange(1, 4096)
        self.new_tokens.setValue(DEFAULT_NEW_TOKENS)
        self.new_tokens.setPrefix("up to ")
        self.new_tokens.setSuffix(" new tokens")
        self.generate_button = QPushButton("Generate")
        self.generate_button.setToolTip("Greedy decoding, the same settings for both")
        self.generate_button.clicked.connect(self.generate)
        self.status_label = QLabel()
        self.status_label.setWordWrap(True)
        self.base_view, self.adapted_view = QPlainTextEdit(), QPlainTextEdit()
        for view in (self.base_view, self.adapted_view):
            view.setReadOnly(True)
        self.adapted_title = QLabel("<b>With the adapter</b>")
        self.adapted_title.setWordWrap(True)
        row = QHBoxLayout()
        row.addWidget(self.new_tokens)
        row.addWidget(self.generate_button)
        row.addStretch(1)
        split = QSplitter(Qt.Horizontal)
        for title, view in ((QLabel("<b>Base model</b>"), self.base_view), (self.adapted_title, self.adapted_view)):
            column = QWidget()
            column_layout = QVBoxLayout(column)
            column_layout.setContentsMargins(0, 0, 0, 0)
            column_layout.addWidget(title)
            column_layout.addWidget(view, 1)
            split.addWidget(column)
            split.setStretchFactor(split.count() - 1, 1)  # two equal columns
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(QLabel("Prompt"))
        layout.addWidget(self.prompt_edit)
        layout.addLayout(row)
        layout.addWidget(self.status_label)
        layout.addWidget(split, 1)
        self._update()

    def set_model(self, loaded: LoadedModel | None) -> None:
        self._base = None if loaded is None or loaded.plan_only else loaded
        self._adapted = None
        self._update()

    @Slot(object)
    def set_adapter(self, folder: Path | None) -> None:
        if folder != self._adapter_dir:
            self._adapter_dir = folder
            self._adapted = None  # frees the old copy; a running job holds its own and its result is not kept
        self._update()

    def is_busy(self) -> bool:
        return self._job is not None

    @Slot()
    def generate(self) -> None:
        if self._job is not None or self._base is None or self._adapter_dir is None:
            return
        base, folder, prompt = self._base, self._adapter_dir, self.prompt_edit.toPlainText().strip()
        new_tokens, cached = self.new_tokens.value(), self._adapted

        def job(_report: Report) -> tuple[AdaptedModel, Answers]:
            adapted = cached if cached is not None and cached.adapter_dir == folder else AdaptedModel(base, folder)
            return adapted, adapted.answers(prompt, new_tokens)

        self._job = BackgroundJob(job, name="playground")
        self._job.worker.sig_result.connect(self._on_job_result)
        self._job.worker.sig_failed.connect(self._on_job_failed)
        self._job.worker.sig_finished.connect(self._on_job_finished)
        self.status_label.setStyleSheet("")
        self.status_label.setText("Generating…")
        self._update()
        self._job.start()

    @Slot(object)
    def _on_job_result(self, result: tuple[AdaptedModel, Answers]) -> None:
        adapted, answers = result
        if adapted.adapter_dir == self._adapter_dir:
            self._adapted = adapted
        self.last_answers = answers
        self.base_view.setPlainText(answers.base)
        self.adapted_view.setPlainText(answers.adapted)
        self.status_label.setText("Same prompt, same greedy settings" + (
            "; the answers are the same" if answers.base == answers.adapted else ""))

    @Slot(object)
    def _on_job_failed(self, failure: WorkFailed) -> None:
        self.status_label.setStyleSheet(ERROR_STYLE)
        self.status_label.setText(f"Cannot generate: {failure.message}")

    @Slot()
    def _on_job_finished(self) -> None:
        self._job = None
        self._update()

    def _update(self) -> None:
        ready = self._base is not None and self._adapter_dir is not None
        self.generate_button.setEnabled(ready and self._job is None)
        folder = self._adapter_dir
        self.adapted_title.setText(f"<b>With the adapter</b> ({folder.parent.name}/{folder.name})" if folder else
                                   "<b>With the adapter</b>")
        self.adapted_title.setToolTip(str(folder or ""))
        if not ready:
            self.status_label.setText(NOT_READY)
        elif self.status_label.text() == NOT_READY:
            self.status_label.clear()
