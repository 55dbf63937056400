"""TS-DPO benchmarks on the embedded model: a linearized DPO step against an ordinary DPO step
(reference forward + policy forward/backward) on the same batch and weights, low-rank vs full, and
the latency of applying a mix of weight-space directions.

Each step measurement runs in its own process. Peak memory is what the steps add on top of the loaded
model and batch: on CPU the highest resident size seen by a 2 ms sampler during warm-up and timed steps,
minus the resident size just before them; on CUDA, max allocated minus allocated before them.
"""

from __future__ import annotations

import json
import threading
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATA, machine, median, pct, record  # noqa: E402


class PeakRSS:
    """Samples this process's resident size in a thread; ru_maxrss cannot be reset, so it would
    report the model load's peak instead of the steps'."""

    def __init__(self, every_s: float = 0.002):
        import psutil

        self.proc, self.every_s, self.peak, self.running = psutil.Process(), every_s, 0, True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.every_s)

    def stop(self) -> float:
        self.running = False
        self.thread.join()
        return self.peak / 2**20


def one(method: str, param: str, steps: int = 3) -> dict:
    """Time `steps` optimizer steps of one configuration (after one warm-up step)."""
    import torch

    from engine.data import load_pairs
    from engine.dpo import encode_pairs
    from engine.models import load_model
    from engine.tangent import DirectionModel, linear_weights

    lm = load_model(attn_implementation="eager")  # the same attention kernels for both methods, so only the method differs
    pairs = load_pairs(DATA / "ultrafeedback_helpfulness_400.jsonl", limit=2).pairs
    batch = encode_pairs(lm, pairs, 128, 128).to(lm.device)
    module = DirectionModel(lm, linear_weights(lm), param, 8, method)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)

    def step():
        loss, _ = module(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()

    cuda = lm.device.type == "cuda"
    import psutil

    base_rss = psutil.Process().memory_info().rss / 2**20
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    sampler = PeakRSS()
    step()  # warm-up: the optimizer state is created here, and counts in the peak
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak_rss = sampler.stop()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else peak_rss - base_rss
    return {"method": method, "param": param, "step_s": median(times), "peak_extra_mb": round(peak, 1),
            "tokens": int(batch.attention_mask.sum()), "weights": len(module.names)}


def _run(method: str, param: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", method, param], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def apply_latency() -> dict:
    import torch

    from engine.mixer import Mixer
    from engine.models import load_model
    from engine.tangent import linear_weights, shared_A0
    from engine.weight_delta import WeightDelta

    lm = load_model()
    params = dict(lm.model.named_parameters())
    names = linear_weights(lm)
    g = torch.Generator().manual_seed(0)
    full = WeightDelta("full", "full", {n: torch.randn(params[n].shape, generator=g) * 1e-4 for n in names},
                            lm.identity(), name="full")
    low = {}
    for n in names:
        low[n + ":B"] = torch.randn(params[n].shape[0], 8, generator=g) * 1e-3
        low[n + ":A"] = shared_A0(n, 8, params[n].shape[1], 0)
    lowrank = WeightDelta("low", "lowrank", low, lm.identity(), name="low")
    out = {}
    for d in (full, lowrank):
        mixer = Mixer(lm)
        mixer.add(d)
        lat = []
        for i in range(20):
            t0 = time.perf_counter()
            mixer.set_weights({d.name: 0.1 + 0.01 * i})
            lat.append(time.perf_counter() - t0)
        mixer.clear()
        out[d.param] = {"median_ms": round(median(lat) * 1e3, 1), "p95_ms": round(pct(lat, 0.95) * 1e3, 1)}
        del mixer
    return out


def main() -> dict:
    print(f"machine: {machine()}")
    res = {(m, p): _run(m, p) for m, p in [("scalarized", "full"), ("tangent", "full"), ("scalarized", "lowrank"),
                                          ("tangent", "lowrank")]}
    for r in res.values():
        print(f"{r['method']:>8} {r['param']:>7}: {r['step_s']:.2f} s/step, peak +{r['peak_extra_mb']:.0f} MB "
              f"({r['tokens']} tokens, {r['weights']} weight matrices)")
    tf, of = res[("tangent", "full")], res[("scalarized", "full")]
    tl, ol = res[("tangent", "lowrank")], res[("scalarized", "lowrank")]
    summary = {
        "ts_dpo_vs_dpo_step_time_full": round(tf["step_s"] / of["step_s"], 3),
        "ts_dpo_vs_dpo_peak_memory_full": round(tf["peak_extra_mb"] / max(of["peak_extra_mb"], 1e-9), 3),
        "ts_dpo_vs_dpo_step_time_lowrank": round(tl["step_s"] / ol["step_s"], 3),
        "ts_dpo_vs_dpo_peak_memory_lowrank": round(tl["peak_extra_mb"] / max(ol["peak_extra_mb"], 1e-9), 3),
        "lowrank_vs_full_step_time_ts_dpo": round(tl["step_s"] / tf["step_s"], 3),
    }
    for k, v in summary.items():
        print(f"{k}: {v}")
    lat = apply_latency()
    for k, v in lat.items():
        print(f"mix apply ({k}): median {v['median_ms']} ms, p95 {v['p95_ms']} ms")
    summary["apply_full_vs_lowrank"] = round(lat["full"]["median_ms"] / max(lat["lowrank"]["median_ms"], 1e-9), 3)
    print(f"apply_full_vs_lowrank: {summary['apply_full_vs_lowrank']}")
    return {"steps": [*res.values()], "apply_latency": lat, **summary}


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--one":
        print(json.dumps(one(sys.argv[2], sys.argv[3])))
    else:
        record("tangent", main())
