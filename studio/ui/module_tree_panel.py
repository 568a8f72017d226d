"""The module tree panel: a filter box, the presets menu and the tree view with its context menu."""

from __future__ import annotations

from PySide6.QtCore import QEvent, QModelIndex, QObject, QPoint, Qt, Slot
from PySide6.QtGui import QAction
from PySide6.QtWidgets import (
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QMenu,
    QToolButton,
    QTreeView,
    QVBoxLayout,
    QWidget,
)

from studio.core.model.inventory import PRESET_DESCRIPTIONS, ModuleTree
from studio.core.model.plan import LoraPlan
from studio.ui.module_tree import NAME, PARAMS, RANK, SHAPE, TYPE, ModuleFilterProxy, ModuleTreeModel
from studio.ui.plan_state import PlanState

FILTER_HINT = "Filter: q_proj · *.mlp.* · re:.*\\.(q|v)_proj"
COLUMN_WIDTHS = {TYPE: 150, SHAPE: 110, PARAMS: 80, RANK: 48}
NAME_MIN_WIDTH = 190  # "gate_proj" four levels deep, with its checkbox
NARROW_DROPS = (TYPE, SHAPE, PARAMS)  # hidden in this order when the dock has no room for them and a readable name


class ModuleTreePanel(QWidget):
    def __init__(self, state: PlanState, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._state = state
        self._presets: dict[str, tuple[str, ...]] = {}
        self.model = ModuleTreeModel(state, self)
        self.proxy = ModuleFilterProxy(self.model, self)

        self.filter_box = QLineEdit()
        self.filter_box.setPlaceholderText(FILTER_HINT)
        self.filter_box.setClearButtonEnabled(True)
        self.filter_box.setToolTip(
            "Show matching modules and the blocks that hold them: a substring (case-insensitive), or a glob "
            "with * ? [ ] or re:<regular expression>, both matched against the whole name (model.layers.0.mlp)"
        )
        self.filter_box.textChanged.connect(self._on_filter_box_text_changed)

        self.presets_menu = QMenu(self)
        self.presets_menu.setToolTipsVisible(True)
        self.presets_button = QToolButton()
        self.presets_button.setText("Presets")
        self.presets_button.setToolTip("Replace the selection with a preset")
        self.presets_button.setPopupMode(QToolButton.InstantPopup)
        self.presets_button.setMenu(self.presets_menu)
        self.presets_button.setEnabled(False)

        self.summary = QLabel("No model open")
        self.summary.setTextInteractionFlags(Qt.TextSelectableByMouse)

        self.view = QTreeView()
        self.view.setModel(self.proxy)
        self.view.setUniformRowHeights(True)  # lets the view skip measuring rows: large trees stay fast
        self.view.setAlternatingRowColors(True)
        self.view.setEditTriggers(QTreeView.DoubleClicked | QTreeView.EditKeyPressed | QTreeView.SelectedClicked)
        self.view.setContextMenuPolicy(Qt.CustomContextMenu)
        self.view.customContextMenuRequested.connect(self._on_view_context_menu)
        header = self.view.header()
        header.setStretchLastSection(False)
        header.setSectionResizeMode(NAME, QHeaderView.Stretch)
        for column, width in COLUMN_WIDTHS.items():
            header.setSectionResizeMode(column, QHeaderView.Interactive)
            header.resizeSection(column, width)
        header.setContextMenuPolicy(Qt.CustomContextMenu)
        header.customContextMenuRequested.connect(self._on_header_context_menu)
        self._hidden_by_user: set[int] = set()
        self.view.viewport().installEventFilter(self)

        top = QHBoxLayout()
        top.addWidget(self.filter_box, 1)
        top.addWidget(self.presets_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(top)
        layout.addWidget(self.view, 1)
        layout.addWidget(self.summary)

        state.sig_plan_changed.connect(self._on_state_plan_changed)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt's name
        if watched is self.view.viewport() and event.type() == QEvent.Resize:
            self.fit_columns()  # the viewport's own width: it is final only once the view has laid it out
        return False

    def fit_columns(self) -> None:
        """Keep the name column readable: in a narrow dock the type, shape and parameter columns give way, in
        that order (the name's tooltip says the type and shape); they come back when there is room."""
        room = self.view.viewport().width()
        shown = [column for column in COLUMN_WIDTHS if column not in self._hidden_by_user]
        for column in NARROW_DROPS:
            if column in shown and NAME_MIN_WIDTH + sum(COLUMN_WIDTHS[c] for c in shown) > room:
                shown.remove(column)
        for column in COLUMN_WIDTHS:
            self.view.setColumnHidden(column, column not in shown)

    @Slot(QPoint)
    def _on_header_context_menu(self, pos: QPoint) -> None:
        self.columns_menu().exec(self.view.header().viewport().mapToGlobal(pos))

    def columns_menu(self) -> QMenu:
        """Tick the columns to show (the name column always shows)."""
        menu = QMenu(self)
        for column in COLUMN_WIDTHS:
            title = str(self.model.headerData(column, Qt.Horizontal))
            action = menu.addAction(title)
            action.setCheckable(True)
            action.setChecked(column not in self._hidden_by_user)
            action.toggled.connect(lambda on, c=column: self._on_column_toggled(c, on))
        return menu

    def _on_column_toggled(self, column: int, on: bool) -> None:
        if on:
            self._hidden_by_user.discard(column)
        else:
            self._hidden_by_user.add(column)
        self.fit_columns()

    def set_presets(self, presets: dict[str, tuple[str, ...]]) -> None:
        """Called with a newly opened model's presets (after the state holds its tree)."""
        self._presets = dict(presets)
        self.presets_menu.clear()
        for name, names in self._presets.items():
            action = self.presets_menu.addAction(f"{name}  ({len(names)} modules)")
            action.setData(name)
            action.setToolTip(PRESET_DESCRIPTIONS.get(name, ""))
            action.triggered.connect(self._on_preset_triggered)
        self.presets_menu.addSeparator()
        clear = self.presets_menu.addAction("Clear selection")
        clear.setData("")
        clear.setToolTip("Untick every module")
        clear.triggered.connect(self._on_preset_triggered)
        self.presets_button.setEnabled(True)
        self.filter_box.clear()
        self.view.expandToDepth(0)

    def preset_action(self, name: str) -> QAction:
        return next(a for a in self.presets_menu.actions() if a.data() == name)

    def apply_preset(self, name: str) -> None:
        self._state.replace_selection(self._presets.get(name, ()))

    def source_index(self, name: str, column: int = NAME) -> QModelIndex:
        """The view's index of a module (for tests and for scrolling to it)."""
        return self.proxy.mapFromSource(self.model.index_of(name, column))

    @Slot()
    def _on_preset_triggered(self) -> None:
        action = self.sender()
        if isinstance(action, QAction):
            self.apply_preset(str(action.data() or ""))

    @Slot(str)
    def _on_filter_box_text_changed(self, text: str) -> None:
        self.proxy.set_filter_text(text)
        if self.proxy.is_filtering:
            self.view.expandAll()  # only matches and their parents are left: show them all
        else:
            self.view.collapseAll()
            self.view.expandToDepth(0)

    @Slot(object)
    def _on_state_plan_changed(self, plan: LoraPlan) -> None:
        tree = self._state.tree
        if tree is None:
            return
        self.summary.setText(
            f"{len(plan.targets)} of {len(tree.targetable)} targetable modules selected"
            + (f", {len(plan.rank_overrides)} with their own rank" if plan.rank_overrides else "")
        )

    @Slot(QPoint)
    def _on_view_context_menu(self, pos: QPoint) -> None:
        index = self.proxy.mapToSource(self.view.indexAt(pos))
        tree = self.model.tree
        if not index.isValid() or tree is None:
            return
        menu = self.context_menu(self.model.name_of(index), tree)
        menu.exec(self.view.viewport().mapToGlobal(pos))

    def context_menu(self, name: str, tree: ModuleTree) -> QMenu:
        """Actions for one module: group toggles over every repeated block, and its rank override."""
        menu = QMenu(self)
        group = self.model.same_pattern(name)
        covered = [n for member in group for n in self.model.covered(member)]
        if len(group) > 1 and covered:
            label = tree[name].pattern.split("*.", 1)[-1]
            select = menu.addAction(f"Select {label} in all {len(group)} blocks")
            select.triggered.connect(lambda: self._state.set_selected(covered, True))
            clear = menu.addAction(f"Clear {label} in all {len(group)} blocks")
            clear.triggered.connect(lambda: self._state.set_selected(covered, False))
        if self.model.covered(name):
            only = menu.addAction(f"Select only {tree[name].leaf}")
            only.triggered.connect(lambda: self._state.replace_selection(self.model.covered(name)))
        if self._state.rank_override(name) is not None:
            reset = menu.addAction("Use the global rank here")
            reset.triggered.connect(lambda: self._state.set_rank_override(name, None))
        menu.addSeparator()
        menu.addAction("Expand all", self.view.expandAll)
        menu.addAction("Collapse all", self.view.collapseAll)
        return menu
