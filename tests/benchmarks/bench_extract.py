"""Steering-vector extraction on the embedded model: 100 pairs, layer choice included (goal <= 60 s on 2 cores),
with the activation pass in "auto" (a bfloat16 copy of the decoder where the CPU has bfloat16 matrix units) and in
the model's own float32, and how far apart the two vectors are. `make bench BENCH=bench_extract.py`; bench_steering
runs the same measurement beside its DPO comparison."""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))

from common import DATA, machine, record  # noqa: E402

from engine.data import load_pairs  # noqa: E402
from engine.models import load_model  # noqa: E402
from engine.steering import extract  # noqa: E402


def measure_extraction(lm, pairs, results: dict):
    """Time ``extract`` in both activation dtypes into ``results``; return the "auto" vector."""
    vectors = {}
    for label, dtype in (("", "auto"), ("_float32", "model")):
        started: dict[str, float] = {}  # phase -> when it began
        t0 = time.perf_counter()
        sv = extract(lm, pairs, batch_size=8, activation_dtype=dtype,
                     progress=lambda p: started.setdefault(p.phase, time.perf_counter()))
        t = time.perf_counter() - t0
        marks = list(started.values()) + [t0 + t]
        phases = {k: round(b - a, 2) for k, a, b in zip(started, marks, marks[1:])}
        results[f"extract{label}_s"] = round(t, 2)
        results[f"extract{label}_phases_s"] = phases
        results[f"extract{label}_activation_dtype"] = sv.meta["method"]["activation_dtype"]
        results[f"extract{label}_layer"] = sv.layers[0]
        print(f"extraction, {len(pairs)} pairs, layer choice included, activations in "
              f"{sv.meta['method']['activation_dtype']}: {t:.1f} s (goal <= 60 s; "
              + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
              + f"), layer {sv.layers[0]} chosen, measured exactly: {sv.meta['steerability_measured']}", flush=True)
        vectors[dtype] = sv
    results["extract_pairs"] = len(pairs)
    cos = torch.nn.functional.cosine_similarity(vectors["auto"].vectors.double(), vectors["model"].vectors.double(), dim=-1)
    results["extract_auto_vs_float32_min_cosine"] = round(float(cos.min()), 6)
    results["extract_float32_vs_auto"] = round(results["extract_float32_s"] / results["extract_s"], 3)
    print(f"every layer's vector, auto vs float32: cosine >= {float(cos.min()):.6f}; "
          f"float32 takes {results['extract_float32_vs_auto']:.2f}x the time of auto")
    return vectors["auto"]


def main() -> dict:
    lm = load_model()
    results: dict = {"machine": machine()}
    print(f"machine: {results['machine']}")
    pairs = load_pairs(DATA / "ultrafeedback_helpfulness_400.jsonl", objective="verbosity",
                       limit=int(os.environ.get("BENCH_PAIRS", 100)))
    measure_extraction(lm, pairs, results)
    return results


if __name__ == "__main__":
    record("extract", main())
