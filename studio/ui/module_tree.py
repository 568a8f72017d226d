"""A Qt item model over the core's ModuleTree, and the filter proxy in front of it.

The model wraps the tree (it never copies it into items): a row is an integer id into the tree's module
order, held in the QModelIndex's internalId. Ticks and rank overrides live in the shared PlanState; the model
only turns them into check states and repaints the rows a change touched: one dataChanged per run of
siblings, or one layout change when a preset touches hundreds of parents. A container's tick covers every
targetable module below it and shows partial when some are ticked.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

from PySide6.QtCore import (
    QAbstractItemModel,
    QModelIndex,
    QObject,
    QPersistentModelIndex,
    QSortFilterProxyModel,
    Qt,
    Slot,
)
from PySide6.QtGui import QBrush, QColor, QFont

from studio.core.model.inventory import ModuleTree, filter_names
from studio.core.model.plan import LoraPlan
from studio.core.units import human_count
from studio.ui.plan_state import ModulesChanged, PlanState

NAME, TYPE, SHAPE, PARAMS, RANK = range(5)
HEADERS = ("Module", "Type", "Shape", "Parameters", "Rank")
# Plain ints and ready-made values: looking up a Qt enum member costs microseconds, and the view asks
# data() for eight roles of every cell it touches.
DISPLAY, EDIT, TOOLTIP, FONT, ALIGNMENT, FOREGROUND, CHECK_STATE, USER = (int(r.value) for r in (
    Qt.DisplayRole, Qt.EditRole, Qt.ToolTipRole, Qt.FontRole, Qt.TextAlignmentRole, Qt.ForegroundRole,
    Qt.CheckStateRole, Qt.UserRole,
))
UNCHECKED, PARTIAL, CHECKED = Qt.Unchecked, Qt.PartiallyChecked, Qt.Checked
UNCHECKED_VALUE = int(Qt.Unchecked.value)
NO_FLAGS = Qt.NoItemFlags
PLAIN = Qt.ItemIsEnabled | Qt.ItemIsSelectable
CHECKABLE = PLAIN | Qt.ItemIsUserCheckable
EDITABLE = PLAIN | Qt.ItemIsEditable
RIGHT = int((Qt.AlignRight | Qt.AlignVCenter).value)
DIM_BRUSH = QBrush(QColor(128, 128, 128))
NO_PARENT = QModelIndex()  # the invisible root, Qt's default argument
BULK_RUNS = 32  # above this many separate row ranges, one layout change is cheaper than many dataChanged
NOTHING_INSIDE = "nothing inside it can take LoRA (no Linear, Conv1D or Embedding layer)"
Index = QModelIndex | QPersistentModelIndex


class ModuleTreeModel(QAbstractItemModel):
    def __init__(self, state: PlanState, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._state = state
        self._tree: ModuleTree | None = None
        self._names: list[str] = []  # id -> module name; id 0 is the (hidden) root ""
        self._ids: dict[str, int] = {}
        self._parent: list[int] = []
        self._row: list[int] = []
        self._children: list[list[int]] = []
        self._covered: list[tuple[str, ...]] = []  # targetable modules at or below each id
        self._by_pattern: dict[str, list[str]] = {}
        self._check_cache: dict[int, Qt.CheckState] = {}  # containers sum over hundreds of layers: ask once
        self._rank = state.plan.rank
        self._bold = QFont()
        self._bold.setBold(True)
        state.sig_tree_changed.connect(self._on_state_tree_changed)
        state.sig_modules_changed.connect(self._on_state_modules_changed)
        state.sig_plan_changed.connect(self._on_state_plan_changed)
        if state.tree is not None:
            self._on_state_tree_changed(state.tree)

    # ---- the tree's shape ---------------------------------------------------------------------------------

    @property
    def tree(self) -> ModuleTree | None:
        return self._tree

    @Slot(object)
    def _on_state_tree_changed(self, tree: ModuleTree) -> None:
        self.beginResetModel()
        self._tree = tree
        self._names = list(tree.modules)
        self._ids = {name: i for i, name in enumerate(self._names)}
        self._parent = [0] * len(self._names)
        self._row = [0] * len(self._names)
        self._children = [[] for _ in self._names]
        for parent_id, name in enumerate(self._names):
            for row, child in enumerate(tree.children.get(name, [])):
                child_id = self._ids[child]
                self._parent[child_id], self._row[child_id] = parent_id, row
                self._children[parent_id].append(child_id)
        covered: list[list[str]] = [[] for _ in self._names]
        for i in reversed(range(len(self._names))):  # children come after parents: gather bottom-up
            if tree[self._names[i]].targetable:
                covered[i].insert(0, self._names[i])
            if i:
                covered[self._parent[i]][0:0] = covered[i]
        self._covered = [tuple(c) for c in covered]
        self._check_cache.clear()
        self._by_pattern = defaultdict(list)
        for name, info in tree.modules.items():
            self._by_pattern[info.pattern].append(name)
        self.endResetModel()

    def name_of(self, index: Index) -> str:
        return self._names[index.internalId()] if index.isValid() else ""

    def index_of(self, name: str, column: int = NAME) -> QModelIndex:
        i = self._ids[name]
        return QModelIndex() if i == 0 else self.createIndex(self._row[i], column, i)

    def covered(self, name: str) -> tuple[str, ...]:
        """Targetable modules a tick on `name` selects: itself if targetable, and everything below it."""
        return self._covered[self._ids[name]]

    def same_pattern(self, name: str) -> list[str]:
        """`name` in every repeated block: model.layers.3.self_attn.q_proj -> q_proj of every layer."""
        if self._tree is None:
            return []
        return self._by_pattern.get(self._tree[name].pattern, [name])

    # ---- QAbstractItemModel -------------------------------------------------------------------------------

    def index(self, row: int, column: int, parent: Index = NO_PARENT) -> QModelIndex:
        parent_id = parent.internalId() if parent.isValid() else 0
        if not self._names or not (0 <= row < len(self._children[parent_id])) or not (0 <= column < 5):
            return QModelIndex()
        return self.createIndex(row, column, self._children[parent_id][row])

    def parent(self, index: Index = NO_PARENT) -> QModelIndex:  # type: ignore[override]
        if not index.isValid():
            return QModelIndex()
        parent_id = self._parent[index.internalId()]
        return QModelIndex() if parent_id == 0 else self.createIndex(self._row[parent_id], 0, parent_id)

    def rowCount(self, parent: Index = NO_PARENT) -> int:
        if not self._names or (parent.isValid() and parent.column() != 0):
            return 0
        return len(self._children[parent.internalId() if parent.isValid() else 0])

    def columnCount(self, parent: Index = NO_PARENT) -> int:
        return len(HEADERS)

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = DISPLAY) -> Any:
        if orientation == Qt.Horizontal and int(role) == DISPLAY:
            return HEADERS[section]
        if orientation == Qt.Horizontal and int(role) == TOOLTIP and section == RANK:
            return "LoRA rank per module: double-click to override the global rank (empty = global)"
        return None

    def flags(self, index: Index) -> Qt.ItemFlag:
        if not index.isValid():
            return NO_FLAGS
        i, column = index.internalId(), index.column()
        if column == NAME and self._covered[i]:
            return CHECKABLE
        if column == RANK and self._covered[i] and self._covered[i][0] == self._names[i]:  # targetable itself
            return EDITABLE
        return PLAIN

    def data(self, index: Index, role: int = DISPLAY) -> Any:
        if not index.isValid() or self._tree is None:
            return None
        role = int(role)
        i, column = index.internalId(), index.column()
        if role == DISPLAY:
            return self._display(self._names[i], column)
        if role == CHECK_STATE:
            return self._check_state(i) if column == NAME and self._covered[i] else None
        if role == FOREGROUND:
            dim = not self._covered[i] or (column == RANK and self._state.rank_override(self._names[i]) is None)
            return DIM_BRUSH if dim else None
        if role == FONT:
            return self._bold if column == RANK and self._state.rank_override(self._names[i]) is not None else None
        if role == ALIGNMENT:
            return RIGHT if column in (PARAMS, RANK) else None
        if role == EDIT and column == RANK:
            override = self._state.rank_override(self._names[i])
            return "" if override is None else str(override)
        if role == TOOLTIP:
            return self._tooltip(self._names[i], column)
        if role == USER:
            return self._names[i]
        return None

    def setData(self, index: Index, value: Any, role: int = EDIT) -> bool:
        if not index.isValid() or self._tree is None:
            return False
        role, i = int(role), index.internalId()
        name = self._names[i]
        if role == CHECK_STATE and index.column() == NAME and self._covered[i]:
            unchecked = int(value.value if isinstance(value, Qt.CheckState) else value) == UNCHECKED_VALUE
            self._state.set_selected(self._covered[i], not unchecked)
            return True
        if role == EDIT and index.column() == RANK and self._tree[name].targetable:
            text = str(value).strip()
            if not text:
                self._state.set_rank_override(name, None)
                return True
            if not text.isdigit() or int(text) < 1:
                return False
            self._state.set_rank_override(name, int(text))
            return True
        return False

    # ---- presentation -------------------------------------------------------------------------------------

    def _display(self, name: str, column: int) -> str:
        assert self._tree is not None
        info = self._tree[name]
        if column == NAME:
            return info.leaf
        if column == TYPE:
            return info.class_name
        if column == SHAPE:
            return info.shape
        if column == PARAMS:
            if not info.total_params:
                return "tied" if info.held_params else ""
            return human_count(info.total_params)
        if column == RANK and info.targetable:
            override = self._state.rank_override(name)
            if override is not None:
                return str(override)
            return str(self._rank) if self._state.is_selected(name) else ""
        return ""

    def _check_state(self, i: int) -> Qt.CheckState:
        state = self._check_cache.get(i)
        if state is None:
            covered = self._covered[i]
            ticked = sum(1 for n in covered if self._state.is_selected(n))
            state = UNCHECKED if ticked == 0 else CHECKED if ticked == len(covered) else PARTIAL
            self._check_cache[i] = state
        return state

    def _tooltip(self, name: str, column: int) -> str:
        assert self._tree is not None
        info = self._tree[name]
        if column == PARAMS and not info.total_params and info.held_params:
            return f"its {info.held_params:,} weights are tied to another module and counted there"
        if column == PARAMS:
            return f"{info.total_params:,} parameters"
        if column == RANK and info.targetable:
            return f"rank of {info.leaf}: type a number to override the global rank, clear it to follow it"
        kind = " · ".join(text for text in (info.class_name, info.shape) if text)
        lines = [f"{name}  ({kind})" if kind else name]  # the type and shape columns hide in a narrow dock
        if not self._covered[self._ids[name]]:
            lines.append(info.why_not if info.kind != "container" else NOTHING_INSIDE)
        elif not info.targetable:
            lines.append(f"ticks the {len(self._covered[self._ids[name]])} targetable layers inside it")
        if info.is_output_head:
            lines.append("the output head: targetable, but left out of the all-linear preset as in PEFT")
        return "\n".join(lines)

    # ---- repaint only what changed ------------------------------------------------------------------------

    @Slot(object)
    def _on_state_modules_changed(self, change: ModulesChanged) -> None:
        touched: set[int] = set()
        self._check_cache.clear()
        for name in change.names:
            i = self._ids.get(name)
            while i is not None and i not in touched and i != 0:
                touched.add(i)
                i = self._parent[i]
        self._emit_rows_changed(touched, NAME, RANK)

    @Slot(object)
    def _on_state_plan_changed(self, plan: LoraPlan) -> None:
        if plan.rank != self._rank:
            self._rank = plan.rank
            if self._tree is not None:
                self._emit_rows_changed((self._ids[n] for n in self._tree.targetable), RANK, RANK)

    def _emit_rows_changed(self, ids: Iterable[int], first_column: int, last_column: int) -> None:
        """One dataChanged per run of neighbouring rows; a change spread over many runs (a preset, the global
        rank on a 70B tree: hundreds of parents) is announced as one layout change instead, because the proxy
        and the view pay a fixed cost per signal that adds up to a visible stall."""
        rows_by_parent: dict[int, list[int]] = defaultdict(list)
        for i in ids:
            rows_by_parent[self._parent[i]].append(self._row[i])
        runs: list[tuple[int, int, int]] = []  # (parent id, first row, last row)
        for parent_id, rows in rows_by_parent.items():
            rows.sort()
            start = prev = rows[0]
            for row in rows[1:]:
                if row != prev + 1:
                    runs.append((parent_id, start, prev))
                    start = row
                prev = row
            runs.append((parent_id, start, prev))
        if len(runs) > BULK_RUNS:
            self.layoutAboutToBeChanged.emit()  # nothing moves: persistent indexes stay valid as they are
            self.layoutChanged.emit()
            return
        for parent_id, first, last in runs:
            siblings = self._children[parent_id]
            self.dataChanged.emit(
                self.createIndex(first, first_column, siblings[first]),
                self.createIndex(last, last_column, siblings[last]),
            )


class ModuleFilterProxy(QSortFilterProxyModel):
    """Shows modules matching the filter text (substring, glob or `re:`, as the core matches them) and the
    parents that lead to them."""

    def __init__(self, source: ModuleTreeModel, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._source = source
        self._matches: set[str] | None = None
        self.setSourceModel(source)
        self.setRecursiveFilteringEnabled(True)
        source.modelAboutToBeReset.connect(self._on_source_about_to_be_reset)

    def set_filter_text(self, text: str) -> None:
        tree = self._source.tree
        matches = set(filter_names(tree, text)) if tree is not None and text.strip() else None
        if hasattr(self, "endFilterChange"):  # Qt >= 6.10; invalidateRowsFilter is deprecated there
            self.beginFilterChange()
            self._matches = matches
            self.endFilterChange(QSortFilterProxyModel.Direction.Rows)
        else:
            self._matches = matches
            self.invalidateRowsFilter()

    @property
    def is_filtering(self) -> bool:
        return self._matches is not None

    def filterAcceptsRow(self, source_row: int, source_parent: Index) -> bool:
        if self._matches is None:
            return True
        index = self._source.index(source_row, NAME, source_parent)
        return self._source.name_of(index) in self._matches

    @Slot()
    def _on_source_about_to_be_reset(self) -> None:
        self._matches = None  # a new tree: the old matches name modules it may not have
