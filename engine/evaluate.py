"""Measurements of what a mix does, shared by the CLI, the benchmarks and the studio."""

from __future__ import annotations

import statistics
from typing import Optional, Sequence

from engine.generation import SamplingParams, decode
from engine.mixer import Mixer, batches
from engine.progress import Phase, ProgressFn


def response_lengths(mixer: Mixer, name: str, weights: Sequence[float], prompts: Sequence[str],
                     params: SamplingParams = SamplingParams(max_new_tokens=200),
                     progress: Optional[ProgressFn] = None,
                     texts: Optional[dict[float, list[str]]] = None) -> dict[float, list[int]]:
    """Tokens generated for each prompt at each weight of direction ``name`` (greedy unless ``params`` say otherwise);
    for a steering vector or a low-rank direction all weights of one prompt run as one batch. ``texts``, when
    given, receives the replies themselves (weight -> one per prompt)."""
    lm = mixer.lm
    phase = Phase(progress, "prompts", len(prompts))
    out: dict[float, list[int]] = {w: [] for w in weights}
    rows = [{name: w} for w in weights]
    groups = batches(mixer, rows)  # one batch unless the direction is full rank: then one weight at a time
    for i, prompt in enumerate(prompts):
        ids = lm.prompt_ids(prompt)
        results: list = [None] * len(rows)
        for group in groups:
            with mixer.applied([rows[k] for k in group]):
                for k, r in zip(group, decode(lm, ids, len(group), params, mixer=mixer)):
                    results[k] = r
        for w, r in zip(weights, results):
            out[w].append(r.n_tokens)
            if texts is not None:
                texts.setdefault(w, []).append(r.text)
        phase.update(i + 1)
    return out


def summarize_lengths(lengths: dict[float, list[int]], limit: int,
                      texts: Optional[dict[float, list[str]]] = None) -> list[dict]:
    """Mean and median tokens per weight, how many replies ran into the token limit, and with ``texts`` their
    distinct-2 (unique bigrams / all bigrams over the replies: repetition loops lower it)."""
    from engine.sweep.metrics import distinct_n

    rows = []
    for w, ns in lengths.items():
        row = {"weight": w, "mean_tokens": round(statistics.fmean(ns), 1), "median_tokens": statistics.median(ns),
               "at_limit": sum(n >= limit for n in ns)}
        if texts is not None:
            row["distinct2"] = round(distinct_n(texts[w]), 4)
        rows.append(row)
    return rows


def is_monotonic(values: Sequence[float], increasing: bool = True) -> bool:
    pairs = list(zip(values, values[1:]))
    return all(b >= a for a, b in pairs) if increasing else all(b <= a for a, b in pairs)
