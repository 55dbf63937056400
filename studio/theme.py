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
