"""Light and dark palettes (Fusion style, so both look the same on every platform)."""

from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QApplication


def apply_palette(app: QApplication, dark: bool) -> None:
    app.setStyle("Fusion")
    if not dark:
        app.setPalette(app.style().standardPalette())
        return
    p = QPalette()
    base, window, text, mid = QColor(30, 32, 36), QColor(42, 45, 50), QColor(225, 228, 232), QColor(70, 74, 80)
    for role, color in ((QPalette.Window, window), (QPalette.WindowText, text), (QPalette.Base, base),
                        (QPalette.AlternateBase, window), (QPalette.ToolTipBase, window), (QPalette.ToolTipText, text),
                        (QPalette.Text, text), (QPalette.Button, window), (QPalette.ButtonText, text),
                        (QPalette.BrightText, QColor(255, 90, 90)), (QPalette.Mid, mid),
                        (QPalette.Highlight, QColor(45, 120, 210)), (QPalette.HighlightedText, QColor(255, 255, 255)),
                        (QPalette.Link, QColor(90, 160, 240)), (QPalette.PlaceholderText, QColor(140, 145, 150))):
        p.setColor(role, color)
    for role in (QPalette.Text, QPalette.ButtonText, QPalette.WindowText):
        p.setColor(QPalette.Disabled, role, QColor(120, 124, 130))
    app.setPalette(p)


def restyle_plots(root) -> None:
    """Give every plot under ``root`` the palette's colours now: background, axes, labels and grid. pyqtgraph takes
    its colours when a plot is made, so without this a plot stays light after a switch to dark until it is redrawn."""
    import pyqtgraph as pg

    palette = QApplication.instance().palette()  # the one just set: widgets take it over only as events arrive
    bg, fg = palette.color(QPalette.Window), palette.color(QPalette.WindowText)
    for view in root.findChildren(pg.PlotWidget):
        view.setBackground(bg)
        item = view.getPlotItem()
        for name in ("left", "bottom", "right", "top"):
            axis = item.getAxis(name)
            axis.setPen(fg)
            axis.setTextPen(fg)
            if axis.label is not None:
                axis.label.setDefaultTextColor(fg)
        if item.legend is not None:
            item.legend.setLabelTextColor(fg)
        view.viewport().update()
