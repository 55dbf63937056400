"""The sweep's measures, as plain functions: Pareto front and hypervolume of two objectives, smoothness of
control along an axis, canonical correlations between two representation changes, and distinct-n."""

from __future__ import annotations

import math

import torch


def distinct_n(texts: list[str], n: int = 2) -> float:
    grams, total = set(), 0
    for t in texts:
        words = t.split()
        for i in range(len(words) - n + 1):
            grams.add(tuple(words[i:i + n]))
            total += 1
    return len(grams) / total if total else 0.0


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both coordinates (both maximized)."""
    front = []
    for i, (a, b) in enumerate(points):
        if not any((c >= a and d >= b) and (c > a or d > b) for j, (c, d) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def hypervolume(points: list[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by ``points`` and bounded below by ``reference`` (2 objectives, both maximized)."""
    pts = sorted({p for p in points if p[0] > reference[0] and p[1] > reference[1]}, key=lambda p: -p[0])
    area, best_y = 0.0, reference[1]
    for x, y in pts:
        if y > best_y:
            area += (x - reference[0]) * (y - best_y)
            best_y = y
    return area


def monotonicity(values: list[float], coords: list[float]) -> dict:
    """How monotonically ``values`` move with ``coords``: Kendall's tau (1 = always up, -1 = always down) and
    the total-variation ratio |end - start| / sum |steps| (1 = no back-and-forth)."""
    pairs = [(c, v) for c, v in zip(coords, values) if v is not None and math.isfinite(v)]
    n = len(pairs)
    if n < 2:
        return {"kendall_tau": None, "tv_ratio": None}
    concordant = discordant = 0
    for i in range(n):
        for j in range(i + 1, n):
            s = (pairs[j][0] - pairs[i][0]) * (pairs[j][1] - pairs[i][1])
            concordant += s > 0
            discordant += s < 0
    steps = sum(abs(pairs[i + 1][1] - pairs[i][1]) for i in range(n - 1))
    return {"kendall_tau": (concordant - discordant) / (n * (n - 1) / 2),
            "tv_ratio": abs(pairs[-1][1] - pairs[0][1]) / steps if steps > 0 else 1.0}


def canonical_correlations(a: torch.Tensor, b: torch.Tensor, dims: int = 16) -> list[float]:
    """Canonical correlations between two sets of row vectors (same rows), after PCA to ``dims`` each."""
    def reduce(x: torch.Tensor) -> torch.Tensor:
        x = x.double() - x.double().mean(0)
        u, s, _ = torch.linalg.svd(x, full_matrices=False)
        k = min(dims, int((s > s[0] * 1e-9).sum()))
        return u[:, :k]  # an orthonormal basis of the top-k principal directions' scores

    qa, qb = reduce(a), reduce(b)
    return [float(v) for v in torch.linalg.svdvals(qa.T @ qb).clamp(0, 1)]
