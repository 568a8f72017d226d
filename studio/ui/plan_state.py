"""The plan being edited: one object that the module tree and the adapter panel both change and both watch.

It holds the user's intent (ticked modules, rank overrides, global settings) and hands out a frozen
`LoraPlan` built from it. A rank override typed for a module that is later unticked is kept (nothing the
user typed is lost) but only reaches the plan while the module is a target.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterable

from PySide6.QtCore import QObject, Signal

from studio.core.model.inventory import ModuleTree
from studio.core.model.plan import LoraPlan


@dataclass(frozen=True)
class ModulesChanged:
    """Modules whose tick or rank override changed (the tree repaints their rows and their parents)."""

    names: frozenset[str]


class PlanState(QObject):
    sig_modules_changed = Signal(object)  # ModulesChanged, emitted before sig_plan_changed
    sig_plan_changed = Signal(object)  # LoraPlan
    sig_tree_changed = Signal(object)  # ModuleTree, when a new model is opened

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._tree: ModuleTree | None = None
        self._selected: set[str] = set()
        self._rank_overrides: dict[str, int] = {}
        self._settings = LoraPlan(targets=())  # everything except targets and overrides

    @property
    def tree(self) -> ModuleTree | None:
        return self._tree

    @property
    def plan(self) -> LoraPlan:
        if self._tree is None:
            return self._settings
        targets = tuple(n for n in self._tree.targetable if n in self._selected)
        overrides = {n: r for n, r in self._rank_overrides.items() if n in self._selected}
        return replace(self._settings, targets=targets, rank_overrides=overrides)

    def set_tree(self, tree: ModuleTree, selection: Iterable[str] = ()) -> None:
        """A new model: start from `selection`, keep the global settings (rank, alpha, variant...)."""
        self._tree = tree
        self._selected = {n for n in selection if n in tree and tree[n].targetable}
        self._rank_overrides = {}
        self.sig_tree_changed.emit(tree)
        self.sig_plan_changed.emit(self.plan)

    def is_selected(self, name: str) -> bool:
        return name in self._selected

    def rank_override(self, name: str) -> int | None:
        return self._rank_overrides.get(name)

    def set_selected(self, names: Iterable[str], selected: bool) -> None:
        names = set(names)
        changed = names - self._selected if selected else names & self._selected
        if not changed:
            return
        if selected:
            self._selected |= changed
        else:
            self._selected -= changed
        self._announce(changed)

    def replace_selection(self, names: Iterable[str]) -> None:
        new = set(names)
        changed = new ^ self._selected
        self._selected = new
        self._announce(changed)

    def set_rank_override(self, name: str, rank: int | None) -> None:
        """`None` goes back to the global rank."""
        if self._rank_overrides.get(name) == rank:
            return
        if rank is None:
            del self._rank_overrides[name]
        else:
            self._rank_overrides[name] = int(rank)
        self._announce({name})

    def update(self, **settings: Any) -> None:
        """Change global fields of the plan (rank, alpha, dropout, bias, variant, init)."""
        updated = replace(self._settings, **settings)
        if updated != self._settings:
            self._settings = updated
            self.sig_plan_changed.emit(self.plan)

    def _announce(self, changed: set[str]) -> None:
        self.sig_modules_changed.emit(ModulesChanged(frozenset(changed)))
        self.sig_plan_changed.emit(self.plan)
