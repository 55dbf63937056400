"""The one thread that owns the model. The GUI sends it requests through queued signals and only paints.

Every request that touches the model (load, add a direction, apply a mix, compare, extract, train) runs
here, one at a time, in order. Two things are not queued because the worker is busy when they matter:
Stop/Cancel sets the cancellation token of the requests it was pressed for (each request has its own, so a
newer request never erases a Stop), checked between tokens and between decoder blocks; and the point being
dragged is a "latest value" slot: many drag events collapse into one apply of the newest point.

The worker is the one source of truth for what is loaded: after every change it sends the whole list of
directions in the mixer (``directionsChanged``), and a reload of the same model carries them over. Requests
and results are the plain values of ``studio.messages``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Optional

from PySide6.QtCore import QObject, QThread, Signal, Slot

from engine.errors import Cancelled, TsdpoError
from engine.generation import compare
from engine.models import load_model
from engine.progress import CancelToken, Progress
from studio.messages import (BuildJob, ComparisonResult, CompareRequest, DirectionInfo, ExportJob, Failure, Job, JobResult,
                             GapJob, LoadRequest, ModelInfo, PredictJob, PromptSetJob, Reply, SignalJob)

log = logging.getLogger(__name__)


class ModelWorker(QObject):
    busy = Signal(str)  # what it is doing, "" when idle
    progress = Signal(str)  # a line for the status bar
    modelLoaded = Signal(object)  # ModelInfo
    directionsChanged = Signal(object)  # list[DirectionInfo]: every direction in the mixer, in order
    directionAdded = Signal(object)  # DirectionInfo
    mixApplied = Signal(dict, float, float)  # weights, seconds applying, seconds from the drag to applied (-1: refused)
    text = Signal(int, str)  # column, streamed piece
    compared = Signal(object)  # ComparisonResult
    jobProgress = Signal(object)  # engine.progress.Progress
    jobFinished = Signal(object)  # JobResult
    promptRow = Signal(object)  # engine.promptsets.Row, as each row of a prompt set finishes
    failed = Signal(object)  # Failure

    def __init__(self, store=None):
        super().__init__()
        self.store = store
        self.lm = None
        self.mixer = None
        self._pending_lock = threading.Lock()
        self._pending: Optional[tuple[dict, float]] = None

    # ------------------------------------------------------------------ helpers
    def _fail(self, kind: str, title: str, exc: BaseException) -> None:
        if isinstance(exc, TsdpoError):
            log.warning("%s: %s", title, exc)
            message = str(exc)
        else:
            log.error("%s\n%s", title, traceback.format_exc())
            message = f"{type(exc).__name__}: {exc}\n\nThe details are in the log file."
        self.failed.emit(Failure(kind, title, message))

    def _progress(self, p: Progress) -> None:
        log.info("%s", p.phase)
        self.progress.emit(p.phase)

    def _no_model(self, what: str) -> bool:
        if self.lm is None:
            self.failed.emit(Failure("no_model", "No model", f"Load a model {what} (Model menu)."))
            return True
        return False

    # ------------------------------------------------------------------ model and directions
    def _emit_directions(self) -> None:
        self.directionsChanged.emit([DirectionInfo.of(n, d) for n, d in self.mixer.directions.items()]
                                    if self.mixer is not None else [])

    @Slot(object)
    def load(self, request: LoadRequest) -> None:
        from engine.mixer import Mixer

        self.busy.emit("Loading model")
        try:
            lm = load_model(request.source, device=request.device, dtype=request.dtype,
                            trust_remote_code=request.trust_remote_code, progress=self._progress, should_stop=request.token)
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
            self.modelLoaded.emit(ModelInfo.of(lm, kept))
            self._emit_directions()
        except Cancelled:
            self.progress.emit("Loading cancelled; the model loaded before is still in use.")
        except BaseException as exc:  # noqa: BLE001 - any failure becomes a dialog, the app keeps running
            self._fail("load", "Could not load the model", exc)
        finally:
            self.busy.emit("")

    @Slot(str, str)
    def addDirection(self, path: str, name: str) -> None:
        from engine.loading import load_direction

        if self._no_model("before adding directions"):
            return
        self.busy.emit("Loading direction")
        try:
            d = load_direction(path, self.lm)
            if name and name in self.mixer.directions:
                self.directionAdded.emit(DirectionInfo.of(name, self.mixer.directions[name]))
                return
            added = self.mixer.add(d, name=name or None)
            info = DirectionInfo.of(added, d)
            info.interference = [x for x in self.mixer.interference() if added in x[:2]]
            self._emit_directions()
            self.directionAdded.emit(info)
        except BaseException as exc:  # noqa: BLE001
            self._fail("direction", "Could not add the direction", exc)
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
            t0, cpu0 = time.perf_counter(), time.thread_time()
            self.mixer.set_weights(weights)
            done = time.perf_counter()
            log.debug("mix applied: %.3f ms wall, %.3f ms of this thread's CPU", (done - t0) * 1e3, (time.thread_time() - cpu0) * 1e3)
            self.mixApplied.emit(dict(self.mixer.rows[0]), done - t0, done - asked)
        except BaseException as exc:  # noqa: BLE001
            # What is applied now: the mix from before (the request was refused) or the base (it failed midway).
            self.mixApplied.emit(dict(self.mixer.rows[0]) if len(self.mixer.rows) == 1 else {}, -1.0, -1.0)
            self._fail("apply", "Could not apply the mix", exc)

    # ------------------------------------------------------------------ generation
    @Slot(object)
    def compare(self, request: CompareRequest) -> None:
        if self._no_model("first"):
            return
        self.busy.emit("Generating")
        try:
            saving = request.session_id is not None
            comp = compare(self.lm, request.prompt, request.columns, request.params, mixer=self.mixer,
                           on_text=self.text.emit, stop=request.token, store=self.store if saving else None,
                           session_id=request.session_id, blind=request.blind)
            log.info("compared %d columns (%s)", len(request.columns), "batched" if comp.batched else "sequential")
            self.compared.emit(ComparisonResult(
                request.prompt if isinstance(request.prompt, str) else json.dumps(request.prompt, ensure_ascii=False),
                [Reply(cr.column.label, cr.column.weights, cr.column.point, cr.result.text, cr.result.n_tokens,
                       cr.result.seconds, cr.result.tokens_per_s, cr.result.stopped, cr.result.truncated, cr.generation_id)
                 for cr in comp.columns],
                comp.comparison_id, comp.batched, request.blind, request.params.max_new_tokens, comp.batches,
                comp.merged))
            if comp.save_error:
                self.failed.emit(Failure("not_saved", "The replies were not saved",
                                         f"{comp.save_error}\n\nThe replies are shown, but they are not in the session and "
                                         "cannot be rated. Generate again once the database is free."))
        except BaseException as exc:  # noqa: BLE001
            self._fail("generate", "Generation failed", exc)
        finally:
            self.busy.emit("")

    # ------------------------------------------------------------------ jobs
    @Slot(object)
    def runJob(self, job: Job) -> None:
        """Build a direction (then add it to the mix), export the mix, or predict the margin maps.

        The engine runs builds and predictions at the base model whatever the plane has applied, and applies
        the plane's mix again afterwards."""
        if self._no_model("before starting a job"):
            return
        self.busy.emit("Job")
        t0 = time.perf_counter()
        run = {"export": self._export, "predict": self._predict, "gap": self._gap,
               "promptset": self._prompt_set, "signal": self._signal}.get(job.kind, self._build)
        try:
            run(job, t0)
        except Cancelled:
            log.info("job %s cancelled", job.kind)
            self.jobFinished.emit(JobResult(job.kind, time.perf_counter() - t0, cancelled=True))
        except BaseException as exc:  # noqa: BLE001
            self._fail("job", {"export": "The export failed", "predict": "The prediction failed",
                               "gap": "The linearization gap map failed", "signal": "The data check failed",
                               "promptset": "The prompt set stopped"}.get(job.kind, "The job failed"), exc)
            self.jobFinished.emit(JobResult(job.kind, time.perf_counter() - t0, cancelled=True, failed=True))
        finally:
            self.busy.emit("")

    def _build(self, job: BuildJob, t0: float) -> None:
        from engine.directions import file_sha256

        out = Path(job.out)
        if out.exists() and not job.overwrite:
            raise TsdpoError(f"{out} already exists; choose another file name.")
        if job.kind == "extract":
            from engine.steering import extract

            direction = extract(self.lm, job.data.load(), progress=self.jobProgress.emit, should_stop=job.token,
                                strength=job.strength, estimator=job.estimator, band=job.band)
        else:
            from engine.train import TrainConfig, train_direction, train_with_lr_search

            cfg = TrainConfig(method="tangent" if job.kind == "train" else "scalarized", param=job.param, steps=job.steps,
                              lr=job.lr, beta=job.beta, batch_size=job.batch_size, max_prompt_tokens=job.max_tokens,
                              max_response_tokens=job.max_tokens, optimizer=job.optimizer)
            data = job.data.load() if job.kind == "train" else [(job.data.load(), job.weight),
                                                                 (job.second.load(), 1.0 - job.weight)]
            keep = job.keep.load() if job.keep is not None else None
            if job.lr_grid:
                direction = train_with_lr_search(self.lm, data, cfg, job.lr_grid, progress=self.jobProgress.emit,
                                                 should_stop=job.token, objective=job.name, keep=keep).direction
            else:
                direction = train_direction(self.lm, data, cfg, progress=self.jobProgress.emit, should_stop=job.token,
                                            objective=job.name, keep=keep).direction
        if job.name:
            direction.name = job.name
        self.jobProgress.emit(Progress("saving", 0, 1))
        direction.save(out)
        direction.meta["_path"] = str(out.resolve())
        self.jobProgress.emit(Progress("saving", 1, 1))
        not_registered = None
        if self.store is not None:
            try:
                self.store.add_direction(name=direction.name, kind=direction.label, objective=direction.objective,
                                         path=str(out.resolve()), sha256=file_sha256(out),
                                         model_fingerprint=self.lm.fingerprint, session_id=job.session_id)
            except TsdpoError as exc:  # the work is kept: the file is saved and the direction is loaded
                not_registered = str(exc)
        if direction.name in self.mixer.directions:
            direction.name = f"{direction.name} ({out.stem})"
        added = self.mixer.add(direction, name=direction.name)
        self._emit_directions()
        self.directionAdded.emit(DirectionInfo.of(added, direction))
        self.jobFinished.emit(JobResult(job.kind, time.perf_counter() - t0, name=added, path=str(out)))
        if not_registered:
            self.failed.emit(Failure("not_registered", "The direction was not registered",
                                     f"{not_registered}\n\nNothing is lost: the direction is saved in {out} and loaded on "
                                     f"the plane. Once the database is free, register it with `tsdpo directions add {out}` "
                                     "(or add the file again with Directions > Add a direction file)."))

    def _signal(self, job: SignalJob, t0: float) -> None:
        """Per-pair margin gradients at the base model (the engine sets the plane's mix aside and puts it back)."""
        from engine.signal import SignalConfig, data_signal

        cfg = SignalConfig(heldout=job.heldout, max_prompt_tokens=job.max_tokens, max_response_tokens=job.max_tokens)
        result = data_signal(self.lm, job.data.load(), cfg, progress=self.jobProgress.emit, should_stop=job.token)
        seconds = time.perf_counter() - t0
        self.jobFinished.emit(JobResult("signal", seconds, name=job.name, signal=result,
                                        summary=f"{job.name}: {result['verdict']} ({result['train_pairs']} training, "
                                                f"{result['heldout_pairs']} held-out pairs, {seconds:.0f} s)"))

    def _predict(self, job: PredictJob, t0: float) -> None:
        """One JVP per tangent direction per batch of held-out pairs: the gradients behind the predicted maps
        (taken at the base model by the engine, whatever the plane has applied)."""
        from engine.sweep import heldout_pairs_of, margin_gradients

        tangent = {n: d for n, d in self.mixer.directions.items() if d.label == "tangent"}
        if not tangent:
            raise TsdpoError("No TS-DPO tangent direction is loaded. The predicted map needs one (steering vectors and "
                             "scalarized runs have no tangent model to predict from).")
        pairs: dict[str, list] = {}
        for d in tangent.values():
            for objective, p in heldout_pairs_of(d, limit=job.pairs).items():
                pairs.setdefault(objective, p)
        grads = {}
        for objective, p in pairs.items():
            def on_batch(step: Progress, objective=objective) -> None:
                self.jobProgress.emit(replace(step, phase=f"JVPs ({objective})"))

            grads[objective] = margin_gradients(self.lm, p, tangent, progress=on_batch, should_stop=job.token).tolist()
        seconds = time.perf_counter() - t0
        self.jobFinished.emit(JobResult("predict", seconds, name=job.name, prediction={"names": list(tangent), "grads": grads},
                                        summary=f"predicted maps for {', '.join(grads)} from {len(tangent)} direction(s) "
                                                f"in {seconds:.0f} s"))

    def _gap(self, job: GapJob, t0: float) -> None:
        """The gap map for the plane's tangent directions (at the base model whatever the plane has applied: the
        engine sets the mix aside and puts it back). Saved where the window looks for maps, so it is drawn again
        whenever the same directions are on the same layout."""
        import json

        from engine.paths import atomic_write_text
        from engine.plane import PreferencePlane
        from engine.sweep import plane_gap_map
        from studio.heatmaps import gap_maps_dir

        def progress(p: Progress) -> None:
            self.jobProgress.emit(p)

        result = plane_gap_map(self.lm, PreferencePlane.from_json(job.plane), dict(self.mixer.directions), grid=job.grid,
                               n_pairs=job.pairs, progress=progress, should_stop=job.token)
        path = gap_maps_dir() / f"{result['key']}.json"
        atomic_write_text(path, json.dumps(result))
        seconds = time.perf_counter() - t0
        self.jobFinished.emit(JobResult("gap", seconds, name=job.name, path=str(path), gap_map=result,
                                        summary=f"linearization gap over {job.grid} x {job.grid} points in {seconds:.0f} s"))

    def _prompt_set(self, job: PromptSetJob, t0: float) -> None:
        """Every prompt through the job's columns, each row stored and sent to the grid as it finishes; Stop ends
        the run after the row in progress (the rows done are kept)."""
        from engine.promptsets import read_prompt_set, run_prompt_set

        pset = read_prompt_set(job.path, job.limit)
        saving = job.session_id is not None
        result = run_prompt_set(self.lm, pset, job.columns, job.params, mixer=self.mixer,
                                store=self.store if saving else None, session_id=job.session_id, system=job.system,
                                blind=job.blind, progress=self.jobProgress.emit, on_row=self.promptRow.emit, stop=job.token)
        unsaved = sum(1 for r in result.rows if r.save_error)
        seconds = time.perf_counter() - t0
        self.jobFinished.emit(JobResult(
            "promptset", seconds, name=pset.name, path=job.path,
            summary=f"{len(result.rows)} of {len(pset.prompts)} prompts x {len(job.columns)} columns in {seconds:.0f} s"
                    + (" (stopped)" if result.stopped else "") + (f"; {unsaved} rows not saved" if unsaved else "")))

    def _export(self, job: ExportJob, t0: float) -> None:
        """Write the mix the GUI saw at the point when Export was pressed."""
        from engine.export import export_mix

        def progress(p: Progress) -> None:
            self._progress(p)
            self.jobProgress.emit(p)

        weights = {k: v for k, v in job.weights.items() if k in self.mixer.directions}
        result = export_mix(self.lm, self.mixer, weights, job.out, format=job.format, overwrite=job.overwrite,
                            bake_steering=job.bake_steering, dtype=job.dtype, point=job.point, plane=job.plane,
                            progress=progress, should_stop=job.token)
        log.info("exported %s", result.to_json())
        check = result.check.get("result", "")
        self.jobFinished.emit(JobResult("export", result.seconds, name=str(result.path), path=str(result.path),
                                        export=result.to_json(),
                                        summary=f"exported to {result.path} in {result.seconds:.1f} s"
                                                + (f"; check: {check}" if check else "")))


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
        request = LoadRequest(source, device, dtype, trust_remote_code, self._token())
        self._load.emit(request)
        return request.token

    def add_direction(self, path: str, name: str = "") -> None:
        self._add.emit(str(path), name)

    def apply_weights(self, weights: dict) -> None:
        self.worker.offer_weights(weights)
        self._apply.emit()

    def compare(self, request: CompareRequest) -> CancelToken:
        request = replace(request, token=self._token())
        self._compare.emit(request)
        return request.token

    def run_job(self, job: Job) -> CancelToken:
        job = replace(job, token=self._token())
        self._job.emit(job)
        return job.token

    def stop(self) -> None:
        """Stop what runs and what waits: every request sent so far (a finished one does not mind)."""
        for token in self.tokens:
            token.set()

    def shutdown(self, wait_ms: int = 2000) -> bool:
        """Stop what is running and end the thread; True if it ended in time."""
        self.stop()
        self.thread.quit()
        return self.thread.wait(wait_ms)
