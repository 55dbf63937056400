"""The preference plane: a draggable point whose position sets the combination weights.

Only painting and the point-to-weights map (``engine.plane``) live here; applying the mix is the
worker's job. While the point is dragged, ``weightsChanged`` fires on every move; ``released`` fires
when the drag ends.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QGraphicsRectItem, QHBoxLayout,
                               QInputDialog, QLabel, QListWidget, QListWidgetItem, QMessageBox, QPushButton, QTabWidget,
                               QVBoxLayout, QWidget)

from engine.plane import Axis, PreferencePlane, circle_anchors

NONE = "(none)"
NO_HEATMAP = "(no heatmap)"
MARKS = {"measured": dict(symbol="o", brush=pg.mkBrush(255, 255, 255, 200), pen=pg.mkPen("k")),
         "confirmed": dict(symbol="o", brush=pg.mkBrush(40, 170, 70), pen=pg.mkPen("w")),
         "contradicted": dict(symbol="x", brush=pg.mkBrush(220, 40, 40), pen=pg.mkPen(220, 40, 40, width=2))}
NUDGE = 0.05


SANE_WEIGHT = 100.0  # beyond this the GUI asks, and the CLI wants --force

class Square(QWidget):
    """Keeps its one child square (the largest square that fits, centred), so the plane grows with the window and a
    unit on x is a unit on y."""

    def __init__(self, child: QWidget, parent=None, on_resize=None):
        super().__init__(parent)
        self.child = child
        self.on_resize = on_resize
        child.setParent(self)

    def minimumSizeHint(self):
        return self.child.minimumSizeHint().expandedTo(self.child.minimumSize())

    def sizeHint(self):
        return self.child.sizeHint()

    def resizeEvent(self, ev) -> None:
        side = min(self.width(), self.height())
        self.child.setGeometry((self.width() - side) // 2, (self.height() - side) // 2, side, side)
        super().resizeEvent(ev)
        if self.on_resize is not None:
            self.on_resize()


class PlaneView(pg.PlotWidget):
    """The plot: arrow keys nudge the point (Shift for a finer step)."""

    nudged = Signal(float, float)

    def keyPressEvent(self, ev) -> None:
        step = NUDGE / 5 if ev.modifiers() & Qt.ShiftModifier else NUDGE
        moves = {Qt.Key_Left: (-step, 0), Qt.Key_Right: (step, 0), Qt.Key_Up: (0, step), Qt.Key_Down: (0, -step)}
        if ev.key() in moves:
            self.nudged.emit(*moves[ev.key()])
            ev.accept()
        else:
            super().keyPressEvent(ev)


class PreferencePlaneWidget(QWidget):
    weightsChanged = Signal(dict)  # live, while dragging
    released = Signal(dict)  # the drag ended here
    pinsChanged = Signal()
    layoutChanged = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.plane = PreferencePlane()
        self.directions: list[str] = []
        self.pins: dict[str, tuple[float, float]] = {}
        # The mix each pin named when it was pinned: a pin keeps meaning that mix when the layout changes.
        self.pin_mix: dict[str, dict[str, float]] = {}
        self.meanings: dict[str, str] = {}  # direction -> what weight 1 is
        self._anchor_items: dict[str, pg.TargetItem] = {}

        self.view = PlaneView(background=None)
        self.view.setObjectName("plane")
        self.view.setAspectLocked(True)
        self.view.setMinimumSize(220, 220)
        self.view.showGrid(x=True, y=True, alpha=0.25)
        self.view.setMenuEnabled(False)
        self.view.setMouseEnabled(False, False)
        self.view.hideButtons()
        self.view.setFocusPolicy(Qt.StrongFocus)
        self.heatmap = pg.ImageItem()  # a measured or predicted metric over the plane; hidden until chosen
        self.heatmap.setZValue(-10)
        self.heatmap.hide()
        self.view.addItem(self.heatmap)
        self.colorbar = pg.ColorBarItem(colorMap="viridis", interactive=False, width=14)
        self.colorbar.setImageItem(self.heatmap, insert_in=self.view.getPlotItem())
        self.colorbar.hide()
        self.marks = pg.ScatterPlotItem(size=9, pxMode=True)  # measured points; green / red where they confirm / contradict
        self.marks.setZValue(5)
        self.view.addItem(self.marks)
        self.layers: dict[str, dict] = {}
        # Where the point can go: the axes' ranges (the grid beyond it is only margin).
        self.bounds = QGraphicsRectItem(-1, -1, 2, 2)
        self.bounds.setPen(pg.mkPen((128, 128, 128), width=1, style=Qt.DashLine))
        self.bounds.setZValue(3)
        self.view.addItem(self.bounds)
        # Where the mixed model leaves the linearized one the tangent directions were trained on (a gap map).
        self.trust_curve = pg.PlotDataItem(pen=pg.mkPen((230, 90, 40), width=2, style=Qt.DashLine), connect="finite")
        self.trust_curve.setZValue(4)
        self.view.addItem(self.trust_curve)
        self.trust_text = pg.TextItem("", color=(230, 90, 40), anchor=(0, 0))  # what the dashed line is
        self.trust_text.setZValue(6)
        self.view.addItem(self.trust_text)
        self.trust_level: Optional[float] = None
        self.view.addItem(pg.InfiniteLine(0, angle=90, pen=pg.mkPen((128, 128, 128), width=1)))
        self.view.addItem(pg.InfiniteLine(0, angle=0, pen=pg.mkPen((128, 128, 128), width=1)))
        self.pin_scatter = pg.ScatterPlotItem(size=10, symbol="d", brush=pg.mkBrush(240, 160, 40), pen=pg.mkPen("k"))
        self.pin_scatter.sigClicked.connect(self._pin_clicked)
        self.view.addItem(self.pin_scatter)
        self._pin_labels: list[pg.TextItem] = []
        self.target = pg.TargetItem(pos=(0, 0), size=16, symbol="o", pen=pg.mkPen((30, 120, 220), width=2),
                                    brush=pg.mkBrush(30, 120, 220, 90), movable=True)
        self.target.sigPositionChanged.connect(self._moved)
        self.target.sigPositionChangeFinished.connect(self._finished)
        self.view.addItem(self.target)
        self.view.nudged.connect(self.nudge)

        self.x_combo, self.y_combo = QComboBox(), QComboBox()
        self.x_combo.setObjectName("x_direction")
        self.y_combo.setObjectName("y_direction")
        self.x_scale, self.y_scale = (QDoubleSpinBox(minimum=0.05, maximum=20.0, singleStep=0.25, value=1.0, decimals=2)
                                      for _ in range(2))
        self.x_range, self.y_range = (QDoubleSpinBox(minimum=0.1, maximum=10.0, singleStep=0.5, value=1.0, decimals=1)
                                      for _ in range(2))
        self.anchor_mode = QCheckBox("Anchor layout (all directions)")
        self.anchor_mode.setToolTip("Place every direction as an anchor on a circle: the point's weights come from its "
                                    "distances to the anchors (drag an anchor to move it), instead of one direction per axis")
        self.anchor_mode.setEnabled(False)
        for axis, combo, scale, rng in (("x", self.x_combo, self.x_scale, self.x_range),
                                        ("y", self.y_combo, self.y_scale, self.y_range)):
            combo.setToolTip(f"The direction the {axis} axis mixes in")
            scale.setToolTip(f"The weight at {axis} = 1: weight = {axis} x scale")
            rng.setToolTip(f"How far the point can go along {axis} (the dashed frame)")
        for w in (self.x_combo, self.y_combo):
            w.currentTextChanged.connect(self._axes_edited)
        for w in (self.x_scale, self.y_scale, self.x_range, self.y_range):
            w.valueChanged.connect(self._axes_edited)
        self.anchor_mode.toggled.connect(self._axes_edited)
        self.heat_combo = QComboBox()
        self.heat_combo.setObjectName("heatmap")
        self.heat_combo.setToolTip("Colour the plane with a measured or predicted metric (a sweep, the margin "
                                   "prediction, or the linearization gap; Directions and View menus)")
        self.heat_combo.addItem(NO_HEATMAP)
        self.heat_combo.currentTextChanged.connect(self._show_layer)
        self.heat_note = QLabel("")
        self.heat_note.setWordWrap(True)
        self.weights_label = QLabel("")
        self.weights_label.setObjectName("weights")
        self.weights_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.point_label = QLabel("")
        self.meaning_label = QLabel("")  # what weight 1 is for each direction on the plane
        self.meaning_label.setObjectName("weight_meaning")
        self.meaning_label.setWordWrap(True)
        self.pin_button = QPushButton("Pin this point...")
        self.pin_button.setToolTip("Name the point's mix: a pin is a column source, and keeps its mix when the layout changes")
        self.pin_button.clicked.connect(self._ask_pin)
        self.pin_list = QListWidget()
        self.pin_list.setMaximumHeight(70)
        self.pin_list.itemDoubleClicked.connect(lambda item: self.recall(item.data(Qt.UserRole)))

        form = QFormLayout()
        xrow, yrow = QHBoxLayout(), QHBoxLayout()
        for row, combo, scale, rng in ((xrow, self.x_combo, self.x_scale, self.x_range),
                                       (yrow, self.y_combo, self.y_scale, self.y_range)):
            row.addWidget(combo, 2)
            row.addWidget(QLabel("scale"))
            row.addWidget(scale)
            row.addWidget(QLabel("±"))
            row.addWidget(rng)
        form.addRow("x", xrow)
        form.addRow("y", yrow)
        form.addRow(self.anchor_mode)
        form.addRow("Heatmap", self.heat_combo)
        form.addRow(self.heat_note)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.square = Square(self.view, on_resize=self._fit_view)
        layout.addWidget(self.square, 1)
        layout.addWidget(self.point_label)
        layout.addWidget(self.weights_label)
        layout.addWidget(self.meaning_label)
        # The controls under the plane, a tab each, so the plane keeps most of the height on a small screen.
        self.controls = QTabWidget()
        self.controls.setObjectName("plane_controls")
        self.controls.setDocumentMode(True)
        axes = QWidget()
        axes.setLayout(form)
        self.controls.addTab(axes, "Axes")
        pins_tab = QWidget()
        pl = QVBoxLayout(pins_tab)
        pins = QHBoxLayout()
        pins.addWidget(self.pin_button)
        pins.addWidget(QLabel("double-click one to go back to it"))
        pins.addStretch(1)
        pl.addLayout(pins)
        pl.addWidget(self.pin_list)
        self.controls.addTab(pins_tab, "Pins")
        layout.addWidget(self.controls)
        self._refresh_axes()
        self._show_weights()

    # ------------------------------------------------------------------ state
    @property
    def point(self) -> tuple[float, float]:
        p = self.target.pos()
        return float(p.x()), float(p.y())

    def weights(self) -> dict[str, float]:
        return self.plane.weights(*self.point)

    def set_directions(self, names: list[str], meanings: Optional[dict[str, str]] = None) -> None:
        """The loaded directions (and what weight 1 means for each); unbound axes get the first free ones."""
        self.directions = list(names)
        self.meanings = dict(meanings or {})
        for combo in (self.x_combo, self.y_combo):
            current = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems([NONE, *self.directions])
            combo.setCurrentText(current if current in self.directions else NONE)
            combo.blockSignals(False)
        free = [n for n in self.directions if n not in (self.x_combo.currentText(), self.y_combo.currentText())]
        for combo in (self.x_combo, self.y_combo):
            if combo.currentText() == NONE and free:
                combo.setCurrentText(free.pop(0))
        self.anchor_mode.setEnabled(len(self.directions) > 2)
        if len(self.directions) <= 2:
            self.anchor_mode.setChecked(False)
        self._axes_edited()

    def set_plane(self, plane: PreferencePlane, point: tuple[float, float] = (0.0, 0.0)) -> None:
        """Restore a saved layout (session reopen). Axes and anchors of directions that are not loaded are dropped:
        the plane never names a direction the model does not have."""
        known = set(self.directions)
        plane = PreferencePlane(*(Axis(a.direction if a.direction in known else None, a.scale, a.low, a.high)
                                  for a in (plane.x, plane.y)),
                                {k: v for k, v in plane.anchors.items() if k in known}, plane.power)
        for combo, axis in ((self.x_combo, plane.x), (self.y_combo, plane.y)):
            combo.blockSignals(True)
            combo.setCurrentText(axis.direction if axis.direction in self.directions else NONE)
            combo.blockSignals(False)
        for box, value in ((self.x_scale, plane.x.scale), (self.y_scale, plane.y.scale),
                           (self.x_range, plane.x.high), (self.y_range, plane.y.high)):
            box.blockSignals(True)
            box.setValue(value)
            box.blockSignals(False)
        self.anchor_mode.blockSignals(True)
        self.anchor_mode.setChecked(bool(plane.anchors))
        self.anchor_mode.blockSignals(False)
        self.plane = plane
        self._refresh_axes()
        self.set_point(*point)

    def set_point(self, x: float, y: float, emit: bool = True) -> None:
        lim_x, lim_y = self.limits()
        x, y = max(-lim_x, min(lim_x, x)), max(-lim_y, min(lim_y, y))
        self.target.blockSignals(True)
        self.target.setPos(x, y)
        self.target.blockSignals(False)
        self._show_weights()
        if emit:
            self.weightsChanged.emit(self.weights())
            self.released.emit(self.weights())

    def nudge(self, dx: float, dy: float) -> None:
        x, y = self.point
        self.set_point(x + dx, y + dy)

    def recall(self, name: str) -> None:
        if name in self.pins:
            self.set_point(*self.pins[name])

    def add_pin(self, name: str, x: float, y: float, emit: bool = True, weights: Optional[dict] = None) -> None:
        """Pin (x, y) with the mix it gives now (or ``weights``, a restored pin's own)."""
        self.pins[name] = (x, y)
        # A restored pin from before pins kept their mix has {}: it gives the restored layout's mix when asked.
        self.pin_mix[name] = dict(weights) if weights is not None else self.plane.weights(x, y)
        self._draw_pins()
        if emit:
            self.pinsChanged.emit()

    def clear_pins(self) -> None:
        self.pins = {}
        self.pin_mix = {}
        self._draw_pins()

    def pin_weights(self, name: str) -> dict[str, float]:
        """The mix a pin names (what it named when pinned, whatever the layout is now)."""
        return dict(self.pin_mix.get(name) or self.plane.weights(*self.pins[name]))

    def set_heatmap(self, values: Optional[np.ndarray], extent: tuple[float, float, float, float] = (-1, 1, -1, 1)) -> None:
        """Show a metric over the plane (rows = y, cols = x) with its colour bar; None hides it."""
        if values is None:
            self.heatmap.hide()
            self.colorbar.hide()
            return
        x0, x1, y0, y1 = extent
        data = np.asarray(values, dtype=float)
        finite = data[np.isfinite(data)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        self.heatmap.setImage(data.T, autoLevels=False)
        self.heatmap.setRect(x0, y0, x1 - x0, y1 - y0)
        self.colorbar.setLevels((lo, hi))
        self.heatmap.show()
        self.colorbar.show()

    def set_trust_line(self, line: Optional[dict]) -> None:
        """Draw (or, with None, hide) the dashed line where the relative linearization gap crosses ``line["level"]``:
        {"values": rows of y, "xs": [...], "ys": [...], "level": share}."""
        if not line:
            self.trust_curve.setData([], [])
            self.trust_text.setText("")
            self.trust_level = None
            return
        xs, ys = np.asarray(line["xs"], float), np.asarray(line["ys"], float)
        data = np.asarray(line["values"], dtype=float).T  # [x, y]
        data = np.where(np.isfinite(data), data, np.nanmax(data) if np.isfinite(data).any() else 0.0)
        px, py = [], []
        for seg in pg.functions.isocurve(data, float(line["level"]), connected=True, extendToEdge=True):
            seg = np.asarray(seg, float)
            # isocurve puts value [i, j] at (i + 0.5, j + 0.5); the gap was measured at (xs[i], ys[j]).
            gx = np.interp(seg[:, 0] - 0.5, np.arange(len(xs)), xs)
            gy = np.interp(seg[:, 1] - 0.5, np.arange(len(ys)), ys)
            px += [*gx, np.nan]
            py += [*gy, np.nan]
        self.trust_curve.setData(np.asarray(px), np.asarray(py))
        self.trust_level = float(line["level"])
        share = f"{self.trust_level:.0%}"
        if px:
            self.trust_text.setText(f"- - linearization gap {share}")
        else:
            inside = float(np.nanmax(line["values"])) < self.trust_level
            self.trust_text.setText(f"linearization gap {'under' if inside else 'over'} {share} everywhere here")
        lx, ly = self.limits()
        self.trust_text.setPos(-lx, ly)

    def set_layers(self, layers: dict[str, dict], show: Optional[str] = None) -> None:
        """Heatmap layers by name: {"values": rows of y, "extent": (x0, x1, y0, y1), "points": [(x, y, mark)],
        "note": str}. Keeps the chosen layer if it is still there."""
        current = show or self.heat_combo.currentText()
        self.layers = dict(layers)
        self.heat_combo.blockSignals(True)
        self.heat_combo.clear()
        self.heat_combo.addItems([NO_HEATMAP, *self.layers])
        self.heat_combo.setCurrentText(current if current in self.layers else NO_HEATMAP)
        self.heat_combo.blockSignals(False)
        self._show_layer(self.heat_combo.currentText())

    def _show_layer(self, name: str) -> None:
        layer = self.layers.get(name)
        if layer is None:
            self.set_heatmap(None)
            self.marks.setData([])
            self.heat_note.setText("")
            return
        self.set_heatmap(layer["values"], tuple(layer["extent"]))
        self.marks.setData([{"pos": (x, y), **MARKS[mark]} for x, y, mark in layer.get("points", [])])
        self.heat_note.setText(layer.get("note", ""))

    # ------------------------------------------------------------------ internals
    def confirm_large(self, weight: float) -> bool:
        """Weights beyond +-100 are almost always a slip: ask before the plane can reach them."""
        answer = QMessageBox.question(
            self, "A very large weight",
            f"With this scale and range the point can reach a weight of {weight:g}, far beyond where a direction "
            f"means anything (+-{SANE_WEIGHT:g}). Allow it?", QMessageBox.Yes | QMessageBox.No, QMessageBox.No)
        return answer == QMessageBox.Yes

    def limits(self) -> tuple[float, float]:
        if self.plane.anchors:
            return 1.0, 1.0
        return self.x_range.value(), self.y_range.value()

    def _axes_edited(self, *_):
        def name(combo):
            return None if combo.currentText() in ("", NONE) else combo.currentText()

        if self.anchor_mode.isChecked() and len(self.directions) > 2:
            anchors = {k: v for k, v in self.plane.anchors.items() if k in self.directions}
            if set(anchors) != set(self.directions):
                anchors = circle_anchors(self.directions)
            self.plane = PreferencePlane(anchors=anchors)
        else:
            for scale, rng in ((self.x_scale, self.x_range), (self.y_scale, self.y_range)):
                if scale.value() * rng.value() > SANE_WEIGHT and not self.confirm_large(scale.value() * rng.value()):
                    scale.blockSignals(True)
                    scale.setValue(SANE_WEIGHT / rng.value())
                    scale.blockSignals(False)
            xr, yr = self.x_range.value(), self.y_range.value()
            self.plane = PreferencePlane(Axis(name(self.x_combo), self.x_scale.value(), -xr, xr),
                                         Axis(name(self.y_combo), self.y_scale.value(), -yr, yr))
        self._refresh_axes()
        self.layoutChanged.emit()
        self.weightsChanged.emit(self.weights())

    def _refresh_axes(self) -> None:
        anchors = bool(self.plane.anchors)
        for w in (self.x_combo, self.y_combo, self.x_scale, self.y_scale, self.x_range, self.y_range):
            w.setEnabled(not anchors)
        self._fit_view()
        self.view.setLabel("bottom", "(anchor layout)" if anchors else self._axis_label(self.plane.x, "x"))
        self.view.setLabel("left", "" if anchors else self._axis_label(self.plane.y, "y"))
        used = list(self.plane.anchors) if anchors else [a.direction for a in (self.plane.x, self.plane.y) if a.direction]
        self.meaning_label.setText("; ".join(f"{n}: {self.meanings[n]}" for n in used if self.meanings.get(n)))
        self.view.setToolTip("\n".join(f"{n}: {m}" for n, m in self.meanings.items()) or
                             "Drag the point (or use the arrow keys) to mix the directions")
        for item in self._anchor_items.values():
            self.view.removeItem(item)
        self._anchor_items = {}
        for name, (ax, ay) in self.plane.anchors.items():
            item = pg.TargetItem(pos=(ax, ay), size=12, symbol="s", pen=pg.mkPen((200, 60, 60), width=2),
                                 movable=True, label=name, labelOpts={"color": (200, 60, 60), "offset": (8, -8)})
            item.sigPositionChangeFinished.connect(lambda it, n=name: self._anchor_moved(n, it))
            self.view.addItem(item)
            self._anchor_items[name] = item
        self._show_weights()

    def _fit_view(self) -> None:
        """Show exactly where the point can go (and a little margin), whatever size the square has now."""
        lx, ly = self.limits()
        # Equal ranges keep distances true (the anchor layout's weights come from them); unequal ones fill the square.
        self.view.setAspectLocked(False)
        self.view.setXRange(-lx * 1.06, lx * 1.06, padding=0)
        self.view.setYRange(-ly * 1.06, ly * 1.06, padding=0)
        self.view.setAspectLocked(lx == ly)
        self.bounds.setRect(-lx, -ly, 2 * lx, 2 * ly)

    def _axis_label(self, axis: Axis, which: str) -> str:
        if not axis.direction:
            return f"{which}: no direction"
        return axis.direction + (f" · {which} = 1 is weight {axis.scale:g}" if axis.scale != 1 else "")

    def _anchor_moved(self, name: str, item) -> None:
        p = item.pos()
        self.plane.anchors[name] = (float(p.x()), float(p.y()))
        self.layoutChanged.emit()
        self.weightsChanged.emit(self.weights())
        self._show_weights()

    def _moved(self, *_):
        lim_x, lim_y = self.limits()
        x, y = self.point
        if abs(x) > lim_x or abs(y) > lim_y:  # keep the point on the plane
            self.target.blockSignals(True)
            self.target.setPos(max(-lim_x, min(lim_x, x)), max(-lim_y, min(lim_y, y)))
            self.target.blockSignals(False)
        self._show_weights()
        self.weightsChanged.emit(self.weights())

    def _finished(self, *_):
        self.released.emit(self.weights())

    def _show_weights(self) -> None:
        x, y = self.point
        self.point_label.setText(f"point ({x:+.2f}, {y:+.2f})")
        w = self.weights()
        self.weights_label.setText("weights: " + (", ".join(f"{k} {v:+.3f}" for k, v in w.items()) if w else "none (base model)"))

    def _ask_pin(self) -> None:
        name, ok = QInputDialog.getText(self, "Pin this point", "Name:", text=f"P{len(self.pins) + 1}")
        if ok and name.strip():
            self.add_pin(name.strip(), *self.point)

    def _draw_pins(self) -> None:
        self.pin_scatter.setData([{"pos": p, "data": n} for n, p in self.pins.items()])
        for t in self._pin_labels:
            self.view.removeItem(t)
        self._pin_labels = []
        self.pin_list.clear()
        for n, (x, y) in self.pins.items():
            t = pg.TextItem(n, anchor=(0, 1), color=(200, 120, 20))
            t.setPos(x, y)
            self.view.addItem(t)
            self._pin_labels.append(t)
            mix = self.pin_mix.get(n) or {}
            item = QListWidgetItem(f"{n}  ({x:+.2f}, {y:+.2f})  " + (", ".join(f"{k} {v:+.2f}" for k, v in mix.items() if v)
                                                                   or "base"))
            item.setToolTip("The mix this pin names, kept as it was when pinned (a new layout does not change it)")
            item.setData(Qt.UserRole, n)
            self.pin_list.addItem(item)

    def _pin_clicked(self, _scatter, points, *_):
        if len(points):
            self.recall(points[0].data())
