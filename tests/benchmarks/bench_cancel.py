"""Cancel latency on the embedded model: from the moment a request's token is set to the moment the job has
raised ``Cancelled``, in the phases that used to sit longest between checks (the steering layer ranking,
a TS-DPO step, a forward pass of extraction). Goal: under 2 s each. Baseline: the time of one unit of work
the job used to finish before it looked at the flag (one layer's ranking pair of passes, one TS-DPO step)."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATA, machine, record  # noqa: E402


def cancel_after(token, seconds: float, stamp: list) -> threading.Timer:
    def fire():
        stamp.append(time.perf_counter())
        token.set()

    t = threading.Timer(seconds, fire)
    t.start()
    return t


def main() -> int:
    from engine.data import load_pairs
    from engine.errors import Cancelled
    from engine.models import load_model
    from engine.progress import CancelToken
    from engine.steering import extract
    from engine.train import TrainConfig, train_direction

    lm = load_model()
    pairs = load_pairs(DATA / "ultrafeedback_helpfulness_400.jsonl", objective="verbosity", limit=24)
    results = {"machine": machine()}

    # Layer ranking: cancel once the ranking phase has run for a second.
    token, stamp, ranking = CancelToken(), [], {}

    def on_progress(p):
        if p.phase == "ranking layers" and p.done == 2 and "t" not in ranking:
            ranking["t"] = time.perf_counter()
            ranking["pair_of_passes"] = ranking["t"] - ranking.get("start", ranking["t"])
            cancel_after(token, 0.5, stamp)
        if p.phase == "ranking layers" and p.done == 0:
            ranking["start"] = time.perf_counter()

    try:
        extract(lm, pairs, progress=on_progress, should_stop=token)
    except Cancelled:
        results["ranking_cancel_s"] = time.perf_counter() - stamp[0]
        results["ranking_one_layer_s"] = ranking["pair_of_passes"]

    # Extraction forward passes: cancel 1 s into the job.
    token, stamp = CancelToken(), []
    cancel_after(token, 1.0, stamp)
    try:
        extract(lm, pairs, should_stop=token)
    except Cancelled:
        results["forward_cancel_s"] = time.perf_counter() - stamp[0]

    # A TS-DPO step (low-rank, all linear weights): cancel 1.5 s after the first step ended.
    token, stamp, steps = CancelToken(), [], []

    def on_step(p):
        steps.append(time.perf_counter())
        if p.done == 1:
            cancel_after(token, 1.5, stamp)

    try:
        train_direction(lm, pairs, TrainConfig(steps=20, batch_size=2), progress=on_step, should_stop=token)
    except Cancelled:
        results["training_cancel_s"] = time.perf_counter() - stamp[0]
        results["training_step_s"] = steps[1] - steps[0] if len(steps) > 1 else None

    record("cancel", results)
    for k, v in results.items():
        print(f"{k:<22} {v:.3f}" if isinstance(v, float) else f"{k:<22} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
