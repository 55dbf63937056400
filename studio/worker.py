"""The one thread that owns the model. The GUI sends it requests through queued signals and only paints.

Every request that touches the model (load, add a direction, apply a mix, compare, extract, train) runs
here, one at a time, in order. Two things are not queued because the worker is busy when they matter:
Stop/Cancel sets the cancellation token of the requests it was pressed for (each request has its own, so a
newer request never erases a Stop), checked between tokens and between decoder blocks; and the point being
dragged is a "latest value" slot: many drag events collapse into one apply of the newest point.

The worker is the one source of truth for what is loaded: after every change it sends the whole list of
directions in the mixer (``directionsChanged``), and a reload of the same model carries them over.
"""

from __future__ import annotations

import logging
from dataclasses import replace
import threading
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Optional

from PySide6.QtCore import QObject, QThread, Signal, Slot

from engine.errors import Cancelled, TsdpoError
from engine.generation import Column, SamplingParams, compare
from engine.models import load_model
from engine.progress import CancelToken, Progress

log = logging.getLogger(__name__)


def _direction_info(name: str, d) -> dict:
    info = {"name": name, "kind": d.label, "objective": d.objective, "path": d.meta.get("_path", "")}
    if d.kind == "steering":
        info["detail"] = f"layer {', '.join(map(str, d.layers))}, strength {d.strength:g}"
    else:
        val = d.meta.get("validation", {}).get("rewards/accuracies")
        info["detail"] = f"{d.param}" + (f", held-out accuracy {val:.2f}" if val is not None else "")
    return info


class ModelWorker(QObject):
    busy = Signal(str)  # what it is doing, "" when idle
    progress = Signal(str)
    modelLoaded = Signal(dict)
    directionsChanged = Signal(list)  # every direction in the mixer, in order: what the window shows
    directionAdded = Signal(dict)
    mixApplied = Signal(dict, float)  # weights, seconds from request to applied
    text = Signal(int, str)  # column, streamed piece
    compared = Signal(dict)
    jobProgress = Signal(object)  # engine.progress.Progress
    jobFinished = Signal(dict)
    failed = Signal(str, str)  # title, message

    def __init__(self, store=None):
        super().__init__()
        self.store = store
        self.lm = None
        self.mixer = None
        self._pending_lock = threading.Lock()
        self._pending: Optional[tuple[dict, float]] = None

    # ------------------------------------------------------------------ helpers
    def _fail(self, title: str, exc: BaseException) -> None:
        if isinstance(exc, TsdpoError):
            log.warning("%s: %s", title, exc)
            message = str(exc)
        else:
            log.error("%s\n%s", title, traceback.format_exc())
            message = f"{type(exc).__name__}: {exc}\n\nThe details are in the log file."
        self.failed.emit(title, message)

    def _progress(self, p: Progress) -> None:
        log.info("%s", p.phase)
        self.progress.emit(p.phase)

    # ------------------------------------------------------------------ model and directions
    def _emit_directions(self) -> None:
        self.directionsChanged.emit([_direction_info(n, d) for n, d in self.mixer.directions.items()]
                                    if self.mixer is not None else [])

    @Slot(object)
    def load(self, request: dict) -> None:
        from engine.mixer import Mixer

        token = request.get("token") or CancelToken()
        self.busy.emit("Loading model")
        try:
            lm = load_model(request.get("source"), device=request.get("device", "auto"), dtype=request.get("dtype", "auto"),
                            trust_remote_code=bool(request.get("trust_remote_code", False)), progress=self._progress,
                            should_stop=token)
            log.info("loaded %s", lm.describe())
            mixer = Mixer(lm)
            kept = []
            if self.mixer is not None:
                self.mixer.clear()
                if lm.fingerprint == self.lm.fingerprint:  # the same model again: what the session holds stays loaded
                    for name, d in self.mixer.directions.items():
                        mixer.add(d, name=name)
                        kept.append(name)
            self.lm, self.mixer = lm, mixer  # the old model stays in use until the new one has loaded
            self.modelLoaded.emit({**lm.describe(), "kept_directions": kept})
            self._emit_directions()
        except Cancelled:
            self.progress.emit("Loading cancelled; the model loaded before is still in use.")
        except BaseException as exc:  # noqa: BLE001 - any failure becomes a dialog, the app keeps running
            self._fail("Could not load the model", exc)
        finally:
            self.busy.emit("")

    @Slot(str, str)
    def addDirection(self, path: str, name: str) -> None:
        from engine.loading import load_direction

        if self.lm is None:
            self.failed.emit("No model", "Load a model before adding directions.")
            return
        self.busy.emit("Loading direction")
        try:
            d = load_direction(path, self.lm)
            d.meta["_path"] = str(Path(path).resolve())
            if name and name in self.mixer.directions:
                self.directionAdded.emit(_direction_info(name, self.mixer.directions[name]))
                return
            added = self.mixer.add(d, name=name or None)
            info = _direction_info(added, d)
            info["interference"] = [list(x) for x in self.mixer.interference() if added in x[:2]]
            self._emit_directions()
            self.directionAdded.emit(info)
        except BaseException as exc:  # noqa: BLE001
            self._fail("Could not add the direction", exc)
        finally:
            self.busy.emit("")

    # ------------------------------------------------------------------ the point on the plane
    def offer_weights(self, weights: dict) -> None:
        """Called from the GUI thread: replace whatever point is waiting to be applied."""
        with self._pending_lock:
            self._pending = (dict(weights), time.perf_counter())

    @Slot()
    def applyPending(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, None
        if pending is None or self.mixer is None:
            return  # a newer request already took it
        weights, asked = pending
        try:
            self.mixer.set_weights(weights)
            self.mixApplied.emit(dict(self.mixer.rows[0]), time.perf_counter() - asked)
        except BaseException as exc:  # noqa: BLE001
            # What is applied now: the mix from before (the request was refused) or the base (it failed midway).
            self.mixApplied.emit(dict(self.mixer.rows[0]) if len(self.mixer.rows) == 1 else {}, -1.0)
            self._fail("Could not apply the mix", exc)

    # ------------------------------------------------------------------ generation
    @Slot(object)
    def compare(self, request: dict) -> None:
        token = request["token"]
        if self.lm is None:
            self.failed.emit("No model", "Load a model first (Model > Open).")
            return
        self.busy.emit("Generating")
        try:
            columns = [Column(c["label"], c.get("weights") or {}, tuple(c["point"]) if c.get("point") else None)
                       for c in request["columns"]]
            comp = compare(self.lm, request["prompt"], columns, SamplingParams(**request["params"]), mixer=self.mixer,
                           on_text=self.text.emit, stop=token, store=self.store if request.get("session_id") else None,
                           session_id=request.get("session_id"), blind=bool(request.get("blind")))
            log.info("compared %d columns (%s)", len(columns), "batched" if comp.batched else "sequential")
            self.compared.emit({
                "comparison_id": comp.comparison_id, "batched": comp.batched, "prompt": request["prompt"],
                "blind": bool(request.get("blind")), "max_new_tokens": request["params"].get("max_new_tokens"),
                "columns": [{"label": cr.column.label, "weights": cr.column.weights, "point": cr.column.point,
                             "text": cr.result.text, "n_tokens": cr.result.n_tokens, "seconds": cr.result.seconds,
                             "tokens_per_s": cr.result.tokens_per_s, "stopped": cr.result.stopped,
                             "truncated": cr.result.truncated, "generation_id": cr.generation_id} for cr in comp.columns]})
            if comp.save_error:
                self.failed.emit("The replies were not saved",
                                 f"{comp.save_error}\n\nThe replies are shown, but they are not in the session and "
                                 "cannot be rated. Generate again once the database is free.")
        except BaseException as exc:  # noqa: BLE001
            self._fail("Generation failed", exc)
        finally:
            self.busy.emit("")

    # ------------------------------------------------------------------ jobs
    def _job_progress(self, p: Progress) -> None:
        self.jobProgress.emit(p)

    @Slot(object)
    def runJob(self, job: dict) -> None:
        """Extract a steering vector, or train a tangent / scalarized direction, then add it to the mix.

        The engine runs it at the base model whatever the plane has applied, and applies the plane's mix again
        afterwards."""
        from engine.data import load_pairs
        from engine.directions import file_sha256

        token = job["token"]
        if self.lm is None:
            self.failed.emit("No model", "Load a model before starting a job.")
            return
        kind = job["kind"]
        self.busy.emit("Job")
        t0 = time.perf_counter()
        if kind == "export":
            self._export(job, t0, token)
            return
        if kind == "predict":
            self._predict(job, t0, token)
            return
        try:
            out = Path(job["out"])
            if out.exists() and not job.get("overwrite"):
                raise TsdpoError(f"{out} already exists; choose another file name.")
            if kind == "extract":
                from engine.steering import extract

                pairs = load_pairs(job["data"], format=job.get("format"), objective=job.get("objective"), limit=job.get("limit"))
                direction = extract(self.lm, pairs, progress=self._job_progress, should_stop=token,
                                    strength=job.get("strength"))
            else:
                from engine.train import TrainConfig, train_direction

                cfg = TrainConfig(method="tangent" if kind == "train" else "scalarized", param=job.get("param", "lowrank"),
                                  steps=int(job.get("steps", 60)), lr=float(job.get("lr", 0.0)),
                                  beta=float(job.get("beta", 0.1)), batch_size=int(job.get("batch_size", 4)),
                                  max_prompt_tokens=int(job.get("max_tokens", 128)),
                                  max_response_tokens=int(job.get("max_tokens", 128)))
                if kind == "train":
                    data = load_pairs(job["data"], format=job.get("format"), objective=job.get("objective"), limit=job.get("limit"))
                else:
                    w = float(job["weight"])
                    data = [(load_pairs(job["data"], format=job.get("format"), objective=job.get("objective"),
                                        limit=job.get("limit")), w),
                            (load_pairs(job["data_b"], format=job.get("format_b"), objective=job.get("objective_b"),
                                        limit=job.get("limit")), 1.0 - w)]
                direction = train_direction(self.lm, data, cfg, progress=self._job_progress, should_stop=token,
                                            objective=job.get("name")).direction
            if job.get("name"):
                direction.name = job["name"]
            self._job_progress(Progress("saving", 0, 1))
            direction.save(out)
            direction.meta["_path"] = str(out.resolve())
            self._job_progress(Progress("saving", 1, 1))
            not_registered = None
            if self.store is not None:
                try:
                    self.store.add_direction(name=direction.name, kind=direction.label, objective=direction.objective,
                                             path=str(out.resolve()), sha256=file_sha256(out),
                                             model_fingerprint=self.lm.fingerprint, session_id=job.get("session_id"))
                except TsdpoError as exc:  # the work is kept: the file is saved and the direction is loaded
                    not_registered = str(exc)
            if direction.name in self.mixer.directions:
                direction.name = f"{direction.name} ({out.stem})"
            added = self.mixer.add(direction, name=direction.name)
            self._emit_directions()
            self.directionAdded.emit(_direction_info(added, direction))
            self.jobFinished.emit({"kind": kind, "name": added, "path": str(out), "seconds": time.perf_counter() - t0,
                                   "cancelled": False})
            if not_registered:
                self.failed.emit("The direction was not registered",
                                 f"{not_registered}\n\nNothing is lost: the direction is saved in {out} and loaded on the "
                                 f"plane. Once the database is free, register it with `tsdpo directions add {out}` (or "
                                 "add the file again with Directions > Add a direction file).")
        except Cancelled:
            log.info("job %s cancelled", kind)
            self.jobFinished.emit({"kind": kind, "cancelled": True, "seconds": time.perf_counter() - t0})
        except BaseException as exc:  # noqa: BLE001
            self._fail("The job failed", exc)
            self.jobFinished.emit({"kind": kind, "cancelled": True, "failed": True, "seconds": time.perf_counter() - t0})
        finally:
            self.busy.emit("")

    def _predict(self, job: dict, t0: float, token: CancelToken) -> None:
        """One JVP per tangent direction per batch of held-out pairs: the gradients behind the predicted maps
        (taken at the base model by the engine, whatever the plane has applied)."""
        from engine.sweep import heldout_pairs_of, margin_gradients

        try:
            tangent = {n: d for n, d in self.mixer.directions.items() if d.label == "tangent"}
            if not tangent:
                raise TsdpoError("No TS-DPO tangent direction is loaded. The predicted map needs one (steering vectors and "
                                 "scalarized runs have no tangent model to predict from).")
            pairs: dict[str, list] = {}
            for d in tangent.values():
                for objective, p in heldout_pairs_of(d, limit=int(job.get("pairs", 16))).items():
                    pairs.setdefault(objective, p)
            grads = {}
            for objective, p in pairs.items():
                def on_batch(step: Progress, objective=objective) -> None:
                    self.jobProgress.emit(replace(step, phase=f"JVPs ({objective})"))

                grads[objective] = margin_gradients(self.lm, p, tangent, progress=on_batch, should_stop=token).tolist()
            seconds = time.perf_counter() - t0
            self.jobFinished.emit({"kind": "predict", "name": "margin maps", "seconds": seconds, "cancelled": False,
                                   "prediction": {"names": list(tangent), "grads": grads},
                                   "summary": f"predicted maps for {', '.join(grads)} from {len(tangent)} direction(s) "
                                              f"in {seconds:.0f} s"})
        except Cancelled:
            self.jobFinished.emit({"kind": "predict", "cancelled": True, "seconds": time.perf_counter() - t0})
        except BaseException as exc:  # noqa: BLE001
            self._fail("The prediction failed", exc)
            self.jobFinished.emit({"kind": "predict", "cancelled": True, "failed": True, "seconds": time.perf_counter() - t0})
        finally:
            self.busy.emit("")

    def _export(self, job: dict, t0: float, token: CancelToken) -> None:
        """Write the mix the GUI saw at the point when Export was pressed."""
        from engine.export import export_mix

        def progress(p: Progress) -> None:
            self._progress(p)
            self.jobProgress.emit(p)

        try:
            weights = {k: v for k, v in job.get("weights", {}).items() if k in self.mixer.directions}
            result = export_mix(self.lm, self.mixer, weights, job["out"], format=job.get("format", "hf"),
                                overwrite=bool(job.get("overwrite")), bake_steering=bool(job.get("bake_steering")),
                                dtype=job.get("dtype"), point=tuple(job["point"]) if job.get("point") else None,
                                plane=job.get("plane"), progress=progress, should_stop=token)
            log.info("exported %s", result.to_json())
            check = result.check.get("result", "")
            self.jobFinished.emit({"kind": "export", "name": str(result.path), "path": str(result.path),
                                   "seconds": result.seconds, "cancelled": False, "result": result.to_json(),
                                   "summary": f"exported to {result.path} in {result.seconds:.1f} s"
                                              + (f"; check: {check}" if check else "")})
        except Cancelled:
            log.info("export cancelled")
            self.jobFinished.emit({"kind": "export", "cancelled": True, "seconds": time.perf_counter() - t0})
        except BaseException as exc:  # noqa: BLE001
            self._fail("The export failed", exc)
            self.jobFinished.emit({"kind": "export", "cancelled": True, "failed": True, "seconds": time.perf_counter() - t0})
        finally:
            self.busy.emit("")


class WorkerHost(QObject):
    """Lives in the GUI thread; starts the worker thread and forwards requests to it, each with its own
    cancellation token."""

    _load = Signal(object)
    _add = Signal(str, str)
    _apply = Signal()
    _compare = Signal(object)
    _job = Signal(object)

    def __init__(self, store=None, parent=None):
        super().__init__(parent)
        self.thread = QThread()
        self.thread.setObjectName("model-worker")
        self.worker = ModelWorker(store)
        self.worker.moveToThread(self.thread)
        self._load.connect(self.worker.load)
        self._add.connect(self.worker.addDirection)
        self._apply.connect(self.worker.applyPending)
        self._compare.connect(self.worker.compare)
        self._job.connect(self.worker.runJob)
        self.tokens: deque[CancelToken] = deque(maxlen=32)  # of the latest requests: running, queued or done
        self.thread.start()

    def _token(self) -> CancelToken:
        token = CancelToken()
        self.tokens.append(token)
        return token

    def load(self, source=None, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False) -> CancelToken:
        token = self._token()
        self._load.emit({"source": source, "device": device, "dtype": dtype, "trust_remote_code": trust_remote_code,
                         "token": token})
        return token

    def add_direction(self, path: str, name: str = "") -> None:
        self._add.emit(str(path), name)

    def apply_weights(self, weights: dict) -> None:
        self.worker.offer_weights(weights)
        self._apply.emit()

    def compare(self, request: dict) -> CancelToken:
        token = self._token()
        self._compare.emit({**request, "token": token})
        return token

    def run_job(self, job: dict) -> CancelToken:
        token = self._token()
        self._job.emit({**job, "token": token})
        return token

    def stop(self) -> None:
        """Stop what runs and what waits: every request sent so far (a finished one does not mind)."""
        for token in self.tokens:
            token.set()

    def shutdown(self, wait_ms: int = 2000) -> bool:
        """Stop what is running and end the thread; True if it ended in time."""
        self.stop()
        self.thread.quit()
        return self.thread.wait(wait_ms)
