"""TS-DPO benchmarks on the embedded model: a linearized DPO step against an ordinary DPO step
(reference forward + policy forward/backward) on the same batch and weights, low-rank vs full, and
the latency of applying a mix of weight-space directions.

Low rank, both steps run tau = B A0 as a branch beside each linear layer (never materialized): the ordinary
step adds it to the output (``branches.lora_branches``), the TS-DPO step carries it as the tangent of one
forward-mode pass (``branches.tangent_branches``). Full rank, TS-DPO is ``torch.func.jvp`` over the deltas and
the ordinary step a ``functional_call`` at theta0 + tau. The breakdown times the phases of both low-rank steps,
and the TS-DPO forward with each of its three savings taken away in turn.

Each step measurement runs in its own process. Peak memory is what the steps add on top of the loaded
model and batch: on CPU the highest resident size seen by a 2 ms sampler during warm-up and timed steps,
minus the resident size just before them; on CUDA, max allocated minus allocated before them. On CPU the
processes run with glibc's mmap threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_): every tensor of that size
or more is its own mapping, returned when freed, so the resident size follows the live tensors instead of
the heap's high-water mark (with the default dynamic threshold a freed block stays in the heap and the peak
depends on the order of earlier allocations).
"""

from __future__ import annotations

import contextlib
import json
import os
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
            "device": str(lm.device),
            "tokens": int(batch.attention_mask.sum()), "weights": len(module.names)}


def _run(method: str, param: str) -> dict:
    """Step time from one process (the default allocator), peak memory from another (the fixed mmap threshold,
    which costs time: every large tensor is a fresh mapping)."""
    def once(*args, env=None):
        out = subprocess.run([sys.executable, __file__, "--one", method, param, *args], capture_output=True, text=True,
                             check=True, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])

    timed_run = once()
    if sys.platform.startswith("linux") and "cuda" not in timed_run.get("device", ""):
        memory_run = once("1", env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)})
        timed_run["peak_extra_mb"] = memory_run["peak_extra_mb"]
    return timed_run


def breakdown(repeat: int = 3) -> dict:
    """Seconds per phase (the fastest of ``repeat``) of the two low-rank steps on the bench's batch, and of the
    TS-DPO forward without each of its savings: generic forward-mode ``linear`` (a third product per layer,
    x times the weight's zero tangent), the eager attention's softmax (no fused forward-mode kernel), the head
    at every position instead of the completion positions."""

    import torch
    import torch.autograd.forward_ad as fwAD

    from engine.branches import lora_branches, tangent_branches
    from engine.data import load_pairs
    from engine.dpo import encode_pairs
    from engine.hooks import completion_rows
    from engine.models import load_model
    from engine.tangent import DirectionModel, linear_weights

    lm = load_model(attn_implementation="eager")
    pairs = load_pairs(DATA / "ultrafeedback_helpfulness_400.jsonl", limit=2).pairs
    batch = encode_pairs(lm, pairs, 128, 128).to(lm.device)
    module = DirectionModel(lm, linear_weights(lm), "lowrank", 8, "tangent")
    with torch.no_grad():
        for p in module.tau.values():
            p.normal_(0, 1e-3)
    factors, mask = module.factors(), batch.target_mask.bool()
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                  use_cache=False)

    def branch_only(model):
        """The branch as a tangent, every linear layer left to forward-mode AD's own rule."""
        mods, handles = dict(model.named_modules()), []
        for w, (B, A) in factors.items():
            def hook(mod, args, out, A=A, B=B):
                primal, tangent = fwAD.unpack_dual(out)
                branch = (fwAD.unpack_dual(args[0]).primal @ A.T) @ B.T
                return fwAD.make_dual(primal, branch if tangent is None else tangent + branch)
            handles.append(mods[w[: -len(".weight")]].register_forward_hook(hook))
        return _removing(handles)

    def dual(linear=True, attention=True, head=True):
        rows = completion_rows(lm.model, mask) if head else contextlib.nullcontext()
        with rows, fwAD.dual_level(), lm.forward_ad_kernels(dual_attention=attention), \
                (tangent_branches(lm.model, factors) if linear else branch_only(lm.model)):
            logits = lm.model(**kwargs).logits
            logits = logits[0] if head else logits[mask]
            return fwAD.unpack_dual(logits).tangent

    def fastest(fn):
        times = []
        for _ in range(repeat):
            module.zero_grad()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return round(min(times), 3)

    def reference():
        with torch.no_grad(), completion_rows(lm.model, mask):
            lm.model(**kwargs)

    def policy(backward):
        with completion_rows(lm.model, mask), lora_branches(lm.model, factors):
            out = lm.model(**kwargs).logits[0]
        if backward:
            out.float().logsumexp(-1).sum().backward()

    def tangent(backward, **off):
        out = dual(**off)
        if backward:
            out.float().logsumexp(-1).sum().backward()

    out = {"ordinary: reference forward": fastest(reference),
           "ordinary: policy forward": fastest(lambda: policy(False)),
           "ordinary: policy forward + backward": fastest(lambda: policy(True)),
           "ts-dpo: dual forward": fastest(lambda: tangent(False)),
           "ts-dpo: dual forward + backward": fastest(lambda: tangent(True)),
           "ts-dpo: dual forward, forward-mode linear": fastest(lambda: tangent(False, linear=False)),
           "ts-dpo: dual forward, eager softmax": fastest(lambda: tangent(False, attention=False)),
           "ts-dpo: dual forward, head at every position": fastest(lambda: tangent(False, head=False))}
    return out


@contextlib.contextmanager
def _removing(handles):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


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
    parts = json.loads(subprocess.run([sys.executable, __file__, "--breakdown"], capture_output=True, text=True,
                                      check=True).stdout.strip().splitlines()[-1])
    print("low-rank step breakdown (s, fastest of 3):")
    for k, v in parts.items():
        print(f"  {k}: {v}")
    summary["lowrank_breakdown_s"] = parts
    lat = apply_latency()
    for k, v in lat.items():
        print(f"mix apply ({k}): median {v['median_ms']} ms, p95 {v['p95_ms']} ms")
    summary["apply_full_vs_lowrank"] = round(lat["full"]["median_ms"] / max(lat["lowrank"]["median_ms"], 1e-9), 3)
    print(f"apply_full_vs_lowrank: {summary['apply_full_vs_lowrank']}")
    return {"steps": [*res.values()], "apply_latency": lat, **summary}


if __name__ == "__main__":
    if sys.argv[1:] == ["--breakdown"]:
        print(json.dumps(breakdown()))
    elif len(sys.argv) in (4, 5) and sys.argv[1] == "--one":
        print(json.dumps(one(sys.argv[2], sys.argv[3], *(int(a) for a in sys.argv[4:]))))
    else:
        record("tangent", main())
