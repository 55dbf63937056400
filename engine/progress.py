"""What a long job reports, and how it is stopped.

One progress type for every phase of every job (tokenizing, forward passes, ranking layers, training,
saving, loading a model, writing an export, ...), with its own ETA (a stage with nothing to count has
total 0), and one cancellation token per request: a Stop belongs to the request it
was pressed for, so a newer request can never erase it. ``abort_on_cancel`` makes a cancel take effect
inside a forward or backward pass, between two decoder blocks, rather than at the end of a batch.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from engine.errors import Cancelled
from engine.hooks import block_output


@dataclass(frozen=True)
class Progress:
    phase: str
    done: int
    total: int
    eta_s: Optional[float] = None
    metrics: dict = field(default_factory=dict)


ProgressFn = Callable[[Progress], None]
StopFn = Callable[[], bool]


def note(report: Optional[ProgressFn], text: str) -> None:
    """A stage with nothing to count (converting, loading, writing files): a ``Progress`` whose total is 0."""
    if report is not None:
        report(Progress(text, 0, 0))


class Phase:
    """Reports one phase of a job; the ETA comes from this phase's own pace."""

    def __init__(self, report: Optional[ProgressFn], phase: str, total: int):
        self.report, self.phase, self.total = report, phase, max(int(total), 0)
        self.t0 = time.perf_counter()
        self.update(0)

    def update(self, done: int, **metrics) -> None:
        if self.report is None:
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - done) if done else None
        self.report(Progress(self.phase, int(done), self.total, eta, metrics))


class CancelToken:
    """Set from any thread (a Stop or Cancel button, closing the window); checked by the job it belongs to.

    Callable, so it can be passed wherever the engine takes ``should_stop``."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    __call__ = is_set


@contextmanager
def abort_on_cancel(lm, should_stop: Optional[StopFn], what: str, blocks=None) -> Iterator[None]:
    """While the block runs, raise ``Cancelled`` before any decoder block (forward) and after any block's
    gradient (backward) once ``should_stop()`` is true: a cancel then waits for one block, not one batch.
    ``blocks``: other decoder blocks to watch than the model's own (a copy of its decoder)."""
    if should_stop is None:
        yield
        return

    def check(*_):
        if should_stop():
            raise Cancelled(what)

    def after(module, args, output):
        h = block_output(output)
        if getattr(h, "requires_grad", False):
            try:
                h.register_hook(check)
            except RuntimeError:  # inside a functorch transform tensors take no hooks; the forward check remains
                pass

    handles = []
    try:
        for block in (lm.decoder_layers() if blocks is None else blocks):
            handles.append(block.register_forward_pre_hook(check))
            handles.append(block.register_forward_hook(after))
        yield
    finally:
        for h in handles:
            h.remove()
