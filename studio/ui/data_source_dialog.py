"""The Open dialog for training or validation data: a file (or a folder of .txt files), or a hub dataset id typed
where a file name goes (`owner/name`, `owner/name:config@split`). Qt's own dialog, because a native one refuses a
name that is not a file."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import QFileDialog, QWidget

from studio.core.data.hub import parse_hub_id
from studio.core.errors import DataError

FILE_FILTER = "Data files (*.csv *.tsv *.json *.jsonl *.parquet *.txt);;All files (*)"
SOURCE_HINT = "A file, or a hub dataset id typed as the file name: owner/name, owner/name:config@split"


def ask_for_data_source(parent: QWidget, title: str, folder: str) -> str | None:
    """The chosen file's path, or the typed hub dataset id; None when cancelled. Raises DataError for a typed
    name that is neither a file nor a hub id."""
    dialog = QFileDialog(parent, title, folder, FILE_FILTER)
    dialog.setOption(QFileDialog.DontUseNativeDialog)
    dialog.setFileMode(QFileDialog.AnyFile)
    dialog.setLabelText(QFileDialog.FileName, "File or hub id:")
    dialog.setToolTip(SOURCE_HINT)
    if not dialog.exec() or not dialog.selectedFiles():
        return None
    path = Path(dialog.selectedFiles()[0])
    if path.exists():
        return str(path)
    shown = Path(dialog.directory().absolutePath())
    typed = path.relative_to(shown).as_posix() if path.is_relative_to(shown) else str(path)
    if parse_hub_id(typed) is None:
        raise DataError(f"no such file or folder: {path}")
    return typed
