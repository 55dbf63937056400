"""`make bench`: every benchmark, each in its own process (so peak memory is its own), then one summary of
the ratios against their baselines measured in the same run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine  # noqa: E402

ORDER = ["bench_steering.py", "bench_tangent.py", "bench_adapters.py", "bench_export.py", "bench_studio.py", "bench_cancel.py"]
SUMMARY = [
    ("steering", "extraction_vs_dpo_run", "steering extraction time / ordinary DPO run on the same pairs"),
    ("tangent", "ts_dpo_vs_dpo_step_time_full", "TS-DPO step time / ordinary DPO step (full deltas)"),
    ("tangent", "ts_dpo_vs_dpo_peak_memory_full", "TS-DPO peak memory / ordinary DPO (full deltas)"),
    ("tangent", "ts_dpo_vs_dpo_step_time_lowrank", "TS-DPO step time / ordinary DPO step (low-rank)"),
    ("tangent", "ts_dpo_vs_dpo_peak_memory_lowrank", "TS-DPO peak memory / ordinary DPO (low-rank)"),
    ("steering", "apply_vs_decode_step", "steering mix-apply latency / one decode step"),
    ("tangent", "apply_full_vs_lowrank", "weight-space mix-apply latency, full / low-rank"),
    ("steering", "mix_vs_base_tokens_per_s", "generation tokens/s, mixed / base"),
    ("adapters", "merged_vs_adapter_apply", "low-rank mix-apply latency, merged into the weights / as an adapter"),
    ("adapters", "adapter_vs_merged_tokens_per_s", "tokens/s with a low-rank mix, adapter / merged (goal >= 0.85)"),
    ("adapters", "sequential_vs_batched", "3 tangent + steering columns one after another / in one batch (goal >= 2.5)"),
    ("adapters", "base_rows_sequential_vs_batched", "3 base rows, nothing mixed in, one after another / in one batch (the ceiling)"),
    ("steering", "sequential_vs_batched", "3 columns one after another / in one batch (time)"),
    ("studio", "launch_vs_model_load", "launch to usable plane / bare model load"),
    ("export", "export_vs_save_pretrained: hf, 2 tangent directions + check",
     "HF export with its check / plain save_pretrained"),
]


def main() -> int:
    only = sys.argv[1:] or ORDER
    print(f"machine: {machine()}")
    folder = Path(tempfile.mkdtemp(prefix="tsdpo-bench-"))
    env = {**os.environ, "TSDPO_BENCH_JSON": str(folder), "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    for name in only:
        print(f"\n== {name}", flush=True)
        if subprocess.run([sys.executable, str(HERE / name)], env=env).returncode:
            print(f"{name} failed", file=sys.stderr)
            return 1
    figures = {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")}
    print(f"\n== summary (ratios against baselines measured in this run; {time.time() - t0:.0f} s in all)")
    for bench, key, what in SUMMARY:
        value = figures.get(bench, {}).get(key)
        if value is not None:
            print(f"{value:>10.4g}  {what}")
    absolute = [("steering", "extract_s", "s, steering extraction of 100 pairs, layer choice included (goal <= 60)"),
                ("steering", "extract_float32_s", "s, the same with the activation pass in float32"),
                ("steering", "apply_latency_median_ms", "ms, steering mix-apply latency (median)"),
                ("tangent", "apply_latency", "ms, weight-space mix-apply latency full / low-rank (median)"),
                ("steering", "tokens_per_s_base", "tokens/s, base model"),
                ("adapters", "apply_adapter_median_ms", "ms, low-rank mix-apply latency as an adapter (median; goal <= 1)"),
                ("adapters", "apply_adapter_p95_ms", "ms, low-rank mix-apply latency as an adapter (p95; goal <= 2)"),
                ("adapters", "mixer_choice_96_tokens", "the mixer's pick for one low-rank mix x 96 tokens (adapter or merged)"),
                ("adapters", "adapter_cost_per_pass_ms", "ms, what the adapter hooks add to one pass (measured by the mixer)"),
                ("adapters", "merge_and_restore_ms", "ms, one merge + restore of that mix (measured by the mixer)"),
                ("studio", "launch_to_usable_plane_s", "s, launch to usable plane"),
                ("export", "export_hf_checked_s", "s, HF export of the embedded model, with its check"),
                ("cancel", "ranking_cancel_s", "s, cancel latency in the steering layer ranking (goal < 2)"),
                ("cancel", "forward_cancel_s", "s, cancel latency in extraction's forward passes (goal < 2)"),
                ("cancel", "training_cancel_s", "s, cancel latency inside a TS-DPO step (goal < 2)"),
                ("cancel", "training_step_s", "s, one TS-DPO step (what a cancel used to wait for)")]
    for bench, key, what in absolute:
        value = figures.get(bench, {}).get(key)
        if isinstance(value, dict):
            value = " / ".join(str(v["median_ms"]) for v in value.values())
        if value is not None:
            print(f"{value:>10}  {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
