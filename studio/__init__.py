"""tsdpo-studio's desktop app (PySide6 + pyqtgraph): a view over ``engine``, with one worker thread that owns the model."""
