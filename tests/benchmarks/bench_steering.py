"""Steering benchmarks on the embedded model: extraction, mix-apply latency, tokens/s, batched columns."""

from __future__ import annotations

import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))

from bench_extract import measure_extraction  # noqa: E402
from common import DATA, machine, median, pct, record, timed  # noqa: E402

from engine.data import load_pairs  # noqa: E402
from engine.generation import Column, SamplingParams, compare, decode  # noqa: E402
from engine.mixer import Mixer  # noqa: E402
from engine.models import load_model  # noqa: E402
from engine.plane import Axis, PreferencePlane  # noqa: E402
from engine.steering import SteeringVector  # noqa: E402


def main() -> dict:
    lm = load_model()
    results: dict = {"machine": machine()}
    print(f"machine: {results['machine']}")

    # 1. Extraction vs an ordinary DPO run on the same pairs (one epoch, batch 4, the same token caps).
    n_pairs = int(__import__("os").environ.get("BENCH_PAIRS", 100))
    pairs = load_pairs(DATA / "ultrafeedback_helpfulness_400.jsonl", objective="verbosity", limit=n_pairs)
    verb = measure_extraction(lm, pairs, results)
    t_extract = results["extract_s"]
    from engine.train import TrainConfig, train_direction

    cfg = TrainConfig(method="scalarized", param="full", batch_size=4, steps=-(-len(pairs) // 4), val_fraction=0.0,
                      max_prompt_tokens=192, max_response_tokens=192)
    t0 = time.perf_counter()
    train_direction(lm, pairs, cfg)
    t_dpo = time.perf_counter() - t0
    results["dpo_epoch_s"] = round(t_dpo, 2)
    results["extraction_vs_dpo_run"] = round(t_extract / t_dpo, 3)
    print(f"ordinary DPO, one epoch over the same {len(pairs)} pairs ({cfg.steps} steps of 4): {t_dpo:.1f} s "
          f"-> extraction takes {t_extract / t_dpo:.3f}x the time of the DPO run")

    help_ = SteeringVector.load(DATA.parent / "directions" / "helpfulness.steer.safetensors", lm)
    mixer = Mixer(lm)
    mixer.add(verb, "verbosity")
    mixer.add(help_, "helpfulness")
    plane = PreferencePlane(Axis("helpfulness"), Axis("verbosity"))

    # 2. Point -> weights applied (what a drag costs), against one decode step of the model.
    import random

    rng = random.Random(0)
    lat = []
    for _ in range(2000):
        x, y = rng.uniform(-1, 1), rng.uniform(-1, 1)
        t0 = time.perf_counter()
        mixer.set_weights(plane.weights(x, y))
        lat.append(time.perf_counter() - t0)
    mixer.clear()
    prompt = "Give me three tips for writing clear emails."
    ids = lm.prompt_ids(prompt)
    step = median(timed(lambda: decode(lm, ids, 1, SamplingParams(max_new_tokens=2)), 5)) / 2
    results["apply_latency_median_ms"] = round(median(lat) * 1e3, 4)
    results["apply_latency_p95_ms"] = round(pct(lat, 0.95) * 1e3, 4)
    results["apply_vs_decode_step"] = round(median(lat) / step, 5)
    print(f"point -> weights applied: median {median(lat) * 1e3:.3f} ms, p95 {pct(lat, 0.95) * 1e3:.3f} ms "
          f"= {median(lat) / step:.4f} x one decode step ({step * 1e3:.1f} ms)")

    # 3. Tokens/s with a mix applied vs base (fixed 96 tokens: EOS is suppressed by measuring only full runs).
    params = SamplingParams(max_new_tokens=96)

    def tps(weights) -> float:
        mixer.set_weights(weights)
        rates = []
        for _ in range(3):
            r = decode(lm, ids, 1, params, mixer=mixer)[0]
            rates.append(r.n_tokens / r.seconds)
        mixer.clear()
        return median(rates)

    base_tps = tps({})
    mix_tps = tps({"helpfulness": 0.5, "verbosity": 0.5})
    results["tokens_per_s_base"] = round(base_tps, 2)
    results["tokens_per_s_mix"] = round(mix_tps, 2)
    results["mix_vs_base_tokens_per_s"] = round(mix_tps / base_tps, 3)
    print(f"tokens/s: base {base_tps:.1f}, mixed {mix_tps:.1f} -> ratio {mix_tps / base_tps:.3f}")

    # 4. Three columns (base, +1, -1 verbosity) in one batch vs one after another.
    cols = [Column("base"), Column("more", {"verbosity": 1.0}), Column("less", {"verbosity": -1.0})]
    p64 = SamplingParams(max_new_tokens=64)
    t_batched = median(timed(lambda: compare(lm, prompt, cols, p64, mixer=mixer, batched=True), 3))
    t_seq = median(timed(lambda: compare(lm, prompt, cols, p64, mixer=mixer, batched=False), 3))
    results["three_columns_batched_s"] = round(t_batched, 2)
    results["three_columns_sequential_s"] = round(t_seq, 2)
    results["sequential_vs_batched"] = round(t_seq / t_batched, 3)
    print(f"3 columns x 64 tokens: batched {t_batched:.2f} s, one after another {t_seq:.2f} s -> "
          f"batched is {t_seq / t_batched:.2f}x faster")
    return results


if __name__ == "__main__":
    record("steering", main())
