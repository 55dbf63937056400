"""The one thread that owns the model. The GUI sends it requests through queued signals and only paints.

Every request that touches the model runs here, one at a time, in order. Stop is a flag set directly
from the GUI thread (not a queued request, since the worker is busy when it matters) and checked by
generation between tokens.
"""

from __future__ import annotations

import logging
import traceback

from PySide6.QtCore import QObject, QThread, Signal, Slot

from engine.errors import TsdpoError
from engine.generation import SamplingParams, StopFlag, generate
from engine.models import load_model

log = logging.getLogger(__name__)


class ModelWorker(QObject):
    # to the GUI
    busy = Signal(str)  # what it is doing, "" when idle
    progress = Signal(str)
    modelLoaded = Signal(dict)
    text = Signal(str)  # a streamed piece of the reply
    generated = Signal(dict)
    failed = Signal(str, str)  # title, message

    def __init__(self, stop: StopFlag):
        super().__init__()
        self.stop = stop
        self.lm = None

    def _fail(self, title: str, exc: BaseException) -> None:
        if isinstance(exc, TsdpoError):
            log.warning("%s: %s", title, exc)
            message = str(exc)
        else:
            log.error("%s\n%s", title, traceback.format_exc())
            message = f"{type(exc).__name__}: {exc}\n\nThe details are in the log file."
        self.failed.emit(title, message)

    def _progress(self, message: str, fraction=None) -> None:
        log.info("%s", message)
        self.progress.emit(message)

    @Slot(dict)
    def load(self, request: dict) -> None:
        self.busy.emit("Loading model")
        try:
            lm = load_model(request.get("source"), device=request.get("device", "auto"), dtype=request.get("dtype", "auto"),
                            trust_remote_code=bool(request.get("trust_remote_code", False)),
                            progress=self._progress)
            log.info("loaded %s", lm.describe())
            self.lm = lm  # the old model (if any) stays in use until the new one has loaded
            self.modelLoaded.emit(lm.describe())
        except BaseException as exc:  # noqa: BLE001 - any failure becomes a dialog, the app keeps running
            self._fail("Could not load the model", exc)
        finally:
            self.busy.emit("")

    @Slot(str, dict)
    def generate(self, prompt: str, params: dict) -> None:
        if self.lm is None:
            self.failed.emit("No model", "Load a model first (File > Open model).")
            return
        self.busy.emit("Generating")
        try:
            result = generate(self.lm, prompt, SamplingParams(**params), on_text=self.text.emit, stop=self.stop)
            log.info("generated %d tokens in %.2f s%s", result.n_tokens, result.seconds, " (stopped)" if result.stopped else "")
            self.generated.emit({"text": result.text, "n_tokens": result.n_tokens, "seconds": result.seconds,
                                 "tokens_per_s": result.tokens_per_s, "stopped": result.stopped})
        except BaseException as exc:  # noqa: BLE001
            self._fail("Generation failed", exc)
        finally:
            self.busy.emit("")


class WorkerHost(QObject):
    """Lives in the GUI thread; starts the worker thread and forwards requests to it."""

    _load = Signal(dict)
    _generate = Signal(str, dict)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.stop_flag = StopFlag()
        self.thread = QThread()
        self.thread.setObjectName("model-worker")
        self.worker = ModelWorker(self.stop_flag)
        self.worker.moveToThread(self.thread)
        self._load.connect(self.worker.load)
        self._generate.connect(self.worker.generate)
        self.thread.start()

    def load(self, source=None, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False) -> None:
        self._load.emit({"source": source, "device": device, "dtype": dtype, "trust_remote_code": trust_remote_code})

    def generate(self, prompt: str, params: dict) -> None:
        # Cleared here, in request order, so a Stop pressed while the request waits in the queue still counts.
        self.stop_flag.clear()
        self._generate.emit(prompt, params)

    def stop(self) -> None:
        self.stop_flag.set()

    def shutdown(self, wait_ms: int = 15000) -> bool:
        """Stop what is running and end the thread; True if it ended in time."""
        self.stop_flag.set()
        self.thread.quit()
        return self.thread.wait(wait_ms)
