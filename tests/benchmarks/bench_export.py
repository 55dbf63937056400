"""Export time on the embedded model, against writing the same weights with a plain `save_pretrained`."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import REPO, machine, median, record, timed  # noqa: E402
from tiny_model import random_tangent  # noqa: E402

from engine.loading import load_direction  # noqa: E402
from engine.export import export_mix  # noqa: E402
from engine.mixer import Mixer  # noqa: E402
from engine.models import load_model  # noqa: E402

REPEAT = 3


def main() -> dict:
    lm = load_model()
    results: dict = {"machine": machine()}
    print(f"machine: {results['machine']}")
    mixer = Mixer(lm)
    mixer.add(random_tangent(lm, "tangent-a", 1, scale=0.02))
    mixer.add(random_tangent(lm, "tangent-b", 2, scale=0.02))
    for name in ("helpfulness", "verbosity"):
        mixer.add(load_direction(REPO / "assets" / "directions" / f"{name}.steer.safetensors", lm), name=name)
    work = Path(tempfile.mkdtemp(prefix="tsdpo-bench-export-"))
    runs = {
        "save_pretrained (baseline)": lambda out: lm.model.save_pretrained(str(out)),
        "hf, 2 tangent directions, no check": lambda out: export_mix(
            lm, mixer, {"tangent-a": 0.5, "tangent-b": -0.3}, out, verify=False),
        "hf, 2 tangent directions + check": lambda out: export_mix(
            lm, mixer, {"tangent-a": 0.5, "tangent-b": -0.3}, out),
        "hf, tangent + baked steering + check": lambda out: export_mix(
            lm, mixer, {"tangent-a": 0.5, "verbosity": 0.8}, out, bake_steering=True),
        "peft LoRA, 2 low-rank directions": lambda out: export_mix(
            lm, mixer, {"tangent-a": 0.5, "tangent-b": -0.3}, out, format="peft"),
        "llama.cpp control vectors, 2 vectors": lambda out: export_mix(
            lm, mixer, {"helpfulness": 0.6, "verbosity": -0.4}, out, format="controlvector"),
    }
    times = {}
    try:
        for label, run in runs.items():
            samples = []
            for i in range(REPEAT):
                out = work / f"run-{len(times)}-{i}"
                samples += timed(lambda: run(out))
                size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
                shutil.rmtree(out)
            times[label] = median(samples)
            print(f"{label:<40} median {times[label]:6.2f} s of {REPEAT} ({size / 1e6:.1f} MB)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = times["save_pretrained (baseline)"]
    for label, t in times.items():
        if label != "save_pretrained (baseline)":
            key = "export_vs_save_pretrained: " + label
            results[key] = round(t / base, 2)
            print(f"{key}: {t / base:.2f}")
    results["export_hf_checked_s"] = round(times["hf, 2 tangent directions + check"], 2)
    return results


if __name__ == "__main__":
    record("export", main())
