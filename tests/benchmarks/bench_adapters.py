"""Low-rank tangent directions as adapters, on the embedded model (two directions on all 210 linear weights, rank
8, as TS-DPO trains them), against the same mix merged into the weights:

- point -> mix applied: the adapter path vs merging (the in-place path every weight-space mix took before);
- tokens/s with the mix as an adapter vs merged, and which of the two the mixer picks (``prefer_merged``);
- three columns (base, the point, a pinned point; tangent and steering directions both in the mix) in one batch
  vs one after another (each column alone as the mixer picks: adapter, or merged where measured faster);
- three base rows in one batch vs one after another, nothing mixed in: what batching alone buys here.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATA, machine, median, pct, record  # noqa: E402


def main() -> dict:
    import torch

    from engine.generation import Column, SamplingParams, compare, decode
    from engine.loading import load_direction
    from engine.mixer import Mixer
    from engine.models import load_model
    from engine.plane import Axis, PreferencePlane
    from engine.tangent import linear_weights, shared_A0
    from engine.weight_delta import WeightDelta

    print(f"machine: {machine()}")
    results = {"machine": machine()}
    lm = load_model()
    params = dict(lm.model.named_parameters())
    names = linear_weights(lm)
    g = torch.Generator().manual_seed(0)
    mixer = Mixer(lm)
    for objective in ("helpfulness", "verbosity"):
        tensors = {}
        for n in names:
            tensors[n + ":B"] = torch.randn(params[n].shape[0], 8, generator=g) * 2e-3
            tensors[n + ":A"] = shared_A0(n, 8, params[n].shape[1], 0)
        mixer.add(WeightDelta(objective, "lowrank", tensors, lm.identity(), name=f"tangent {objective}"))
    mixer.add(load_direction(DATA.parent / "directions" / "verbosity.steer.safetensors", lm), name="steer verbosity")
    plane = PreferencePlane(Axis("tangent helpfulness"), Axis("tangent verbosity"))

    # 1. Point -> mix applied.
    def latencies(merge: bool, n: int) -> list[float]:
        rng = random.Random(0)
        out = []
        for _ in range(n):
            weights = plane.weights(rng.uniform(-1, 1), rng.uniform(-1, 1))
            t0 = time.perf_counter()
            mixer.set_row_weights([weights], merge=merge)
            out.append(time.perf_counter() - t0)
        mixer.clear()
        return out

    adapter, merged = latencies(False, 500), latencies(True, 20)
    results["apply_adapter_median_ms"] = round(median(adapter) * 1e3, 3)
    results["apply_adapter_p95_ms"] = round(pct(adapter, 0.95) * 1e3, 3)
    results["apply_merged_median_ms"] = round(median(merged) * 1e3, 1)
    results["merged_vs_adapter_apply"] = round(median(merged) / median(adapter), 1)
    print(f"point -> mix applied, 2 low-rank directions on {len(names)} weights: adapter median "
          f"{median(adapter) * 1e3:.3f} ms, p95 {pct(adapter, 0.95) * 1e3:.3f} ms; merged into the weights median "
          f"{median(merged) * 1e3:.1f} ms -> the adapter is {median(merged) / median(adapter):.0f}x faster")

    # 2. Tokens/s, the same mix as an adapter and merged (fixed length: only runs that used every token).
    prompt = "Give me three tips for writing clear emails."
    ids = lm.prompt_ids(prompt)
    p96 = SamplingParams(max_new_tokens=96)
    weights = plane.weights(0.6, -0.4)

    def tps(merge: bool) -> float:
        with mixer.applied([weights], merge=merge):
            r = decode(lm, ids, 1, p96, mixer=mixer)[0]
        return r.n_tokens / r.seconds

    rates = {False: [], True: []}
    for _ in range(5):  # interleaved, so that this machine's drift falls on both sides alike
        for merge in (False, True):
            rates[merge].append(tps(merge))
    tps_adapter, tps_merged = median(rates[False]), median(rates[True])
    results["tokens_per_s_adapter"] = round(tps_adapter, 2)
    results["tokens_per_s_merged"] = round(tps_merged, 2)
    results["adapter_vs_merged_tokens_per_s"] = round(tps_adapter / tps_merged, 3)
    print(f"tokens/s with the mix: adapter {tps_adapter:.1f}, merged {tps_merged:.1f} -> ratio {tps_adapter / tps_merged:.3f}")
    # What the mixer picks for this generation (one row, 96 tokens), from what it measured: the hooks' time per
    # pass during the adapter runs above, and one merge + restore (timed inside prefer_merged on first use).
    choice = mixer.prefer_merged([weights], p96.max_new_tokens)
    per_pass, merge_s = mixer._adapters.cost_per_forward(1), mixer._merge_s
    results["mixer_choice_96_tokens"] = "merged" if choice else "adapter"
    results["adapter_cost_per_pass_ms"] = round(per_pass * 1e3, 2)
    results["merge_and_restore_ms"] = round(merge_s * 1e3, 1)
    print(f"the mixer chooses {results['mixer_choice_96_tokens']} for 96 tokens of one mix: the adapter measured "
          f"{per_pass * 1e3:.2f} ms a pass (x 96 = {per_pass * 96 * 1e3:.0f} ms), a merge and restore {merge_s * 1e3:.0f} ms")
    for cutoff in (16, 64, 256):
        results[f"mixer_choice_{cutoff}_tokens"] = "merged" if mixer.prefer_merged([weights], cutoff) else "adapter"
    print("  and for 16 / 64 / 256 tokens: " + " / ".join(results[f"mixer_choice_{c}_tokens"] for c in (16, 64, 256)))

    # 3. Base, the point and a pinned point, with tangent and steering in the mix.
    point, pinned = plane.weights(0.6, -0.4), plane.weights(-0.5, 0.7)
    cols = [Column("base"), Column("point", {**point, "steer verbosity": 0.5}), Column("pinned", pinned)]
    p64 = SamplingParams(max_new_tokens=64)

    def batched_vs_one_by_one(key: str, what: str, batched, one_by_one) -> float:
        t_batched, t_seq = [], []
        for _ in range(5):  # interleaved, as above
            t0 = time.perf_counter()
            batched()
            t_batched.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            one_by_one()
            t_seq.append(time.perf_counter() - t0)
        results[f"{key}_batched_s"] = round(median(t_batched), 2)
        results[f"{key}_sequential_s"] = round(median(t_seq), 2)
        print(f"{what}: batched {median(t_batched):.2f} s, one after another {median(t_seq):.2f} s -> batched is "
              f"{median(t_seq) / median(t_batched):.2f}x faster")
        return round(median(t_seq) / median(t_batched), 3)

    def together():
        assert compare(lm, prompt, cols, p64, mixer=mixer).batched

    results["sequential_vs_batched"] = batched_vs_one_by_one(
        "three_columns", "3 columns x 64 tokens (tangent + steering)", together,
        lambda: compare(lm, prompt, cols, p64, mixer=mixer, batched=False))

    # 4. The same with nothing mixed in: three base rows in one batch vs three single rows. No adapter, hook or
    # merge, so this is what batching alone buys on this machine: the ceiling of the figure above.
    results["base_rows_sequential_vs_batched"] = batched_vs_one_by_one(
        "three_base_rows", "3 base rows x 64 tokens, nothing mixed in (what batching alone buys)",
        lambda: decode(lm, ids, 3, p64), lambda: [decode(lm, ids, 1, p64) for _ in range(3)])
    return results


if __name__ == "__main__":
    record("adapters", main())
