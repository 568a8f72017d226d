"""Which column plays which role (prompt, response, text, label, messages) for the chosen or detected format:
one combo per role, "auto" by default, naming the column detection picked."""

from __future__ import annotations

from typing import Mapping, Sequence

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QComboBox, QFormLayout, QGroupBox, QLabel, QWidget

from studio.core.data.formats import OPTIONAL_ROLES, REQUIRED_ROLES


class ColumnMapping(QGroupBox):
    sig_changed = Signal()  # the user picked another column for a role

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Columns", parent)
        self.form = QFormLayout(self)
        self.combos: dict[str, QComboBox] = {}
        self._shown: tuple[object, ...] = ()  # what the combos were built for

    def mapping(self) -> dict[str, str]:
        """The columns chosen explicitly (roles left on "auto" are detected)."""
        return {role: combo.currentData() for role, combo in self.combos.items() if combo.currentData()}

    def show_roles(self, fmt: str | None, columns: Sequence[str], mapping: Mapping[str, str],
                   resolved: Mapping[str, str] | None = None) -> None:
        """One combo per role of `fmt` (None: not known yet) over `columns`; `resolved` is what detection chose."""
        resolved = dict(resolved or {})
        key = (fmt, tuple(columns), dict(mapping), resolved)
        if key == self._shown:
            return  # rebuilding would take the focus from a combo the user is in
        self._shown = key
        while self.form.rowCount():
            self.form.removeRow(0)
        self.combos = {}
        if fmt is None:
            self.form.addRow(QLabel("Columns appear once the format is known."))
            return
        optional = OPTIONAL_ROLES.get(fmt, ())  # type: ignore[call-overload]
        for role in REQUIRED_ROLES[fmt] + optional:  # type: ignore[index]
            combo = QComboBox()
            combo.addItem(f"auto ({resolved[role]})" if role in resolved else "auto", None)
            for column in columns:
                combo.addItem(column, column)
            if mapping.get(role):
                if combo.findData(mapping[role]) < 0:
                    combo.addItem(mapping[role], mapping[role])
                combo.setCurrentIndex(combo.findData(mapping[role]))
            combo.currentIndexChanged.connect(self.sig_changed)
            self.form.addRow(f"{role}{' (optional)' if role in optional else ''}", combo)
            self.combos[role] = combo
