"""The rows left out of training, as a list model over the core's `BadRow` tuple: a view asks for the rows it
shows, so a file with a hundred thousand bad rows costs the window nothing until scrolled to."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from PySide6.QtCore import QAbstractListModel, QModelIndex, QObject, QPersistentModelIndex, Qt

from studio.core.data.dataset import BadRow


def source_label(file: str) -> str:
    """A data file by its name; a hub dataset (or a relative path) as given."""
    return Path(file).name if Path(file).is_absolute() else file


class BadRowsModel(QAbstractListModel):
    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.bad_rows: tuple[BadRow, ...] = ()

    def set_rows(self, rows: Sequence[BadRow]) -> None:
        self.beginResetModel()
        self.bad_rows = tuple(rows)
        self.endResetModel()

    def rowCount(self, parent: QModelIndex | QPersistentModelIndex = QModelIndex()) -> int:  # noqa: B008, N802
        return 0 if parent.isValid() else len(self.bad_rows)

    def data(self, index: QModelIndex | QPersistentModelIndex, role: int = Qt.DisplayRole) -> Any:
        if not index.isValid():
            return None
        row = self.bad_rows[index.row()]
        if role == Qt.DisplayRole:
            return f"{source_label(row.file)}, row {row.row}: {row.reason}"
        if role == Qt.ToolTipRole:
            return str(row)
        return None
