"""What the ratings add up to: per source (base, each pin, the point, each baseline) wins, ties and losses, a win rate
with a 95% interval, a Bradley-Terry strength with an interval, and per-attribute score means; blind and unblind
ratings apart, filtered by prompt set and date.

A rated comparison of k columns is k(k-1)/2 games: the winner beats every other column, a tie or 'both bad' is a tie
between every two (both bad says nothing about which is better). When a comparison was rated more than once the
latest rating counts (as for the TRL export). Two columns with the same source in one comparison play no game."""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterable, Optional

import torch

from engine.errors import TsdpoError

Z95 = 1.959963984540054
BT_PRIOR_SD = 3.0  # a weak Gaussian prior on each strength: finite when a source won (or lost) every game


class RatingsError(TsdpoError):
    pass


def source_of(label: str) -> str:
    """The source a column's label names: 'point (+0.50, -0.20)' is the point wherever it was; the rest as labelled."""
    return "point" if re.fullmatch(r"point \(.*\)", label) else label


@dataclass
class Game:
    a: str
    b: str
    score: float  # for a: 1 win, 0.5 tie, 0 loss
    blind: bool
    comparison_id: int


@dataclass
class RatedComparison:
    comparison_id: int
    prompt: str
    prompt_set: Optional[str]
    created_at: datetime
    blind: bool
    outcome: str
    sources: list[str]  # one per column, in column order
    winner: Optional[int]  # the winning column's index
    scores: dict[int, dict[str, int]] = field(default_factory=dict)  # column index -> attribute -> score (1-5)


def rated_comparisons(store, session_id: Optional[int] = None, prompt_set: Optional[str] = None,
                      since: Optional[datetime] = None, until: Optional[datetime] = None) -> list[RatedComparison]:
    """The latest rating of every rated comparison (of one session, or all), filtered."""
    sessions = [store.session(session_id)] if session_id is not None else store.sessions(limit=1_000_000)
    out = []
    for sess in sessions:
        for comp in store.history(sess.id):
            if not comp.ratings:
                continue
            r = comp.ratings[-1]
            pset = (comp.params or {}).get("prompt_set")
            if prompt_set is not None and pset != prompt_set:
                continue
            when = r.created_at if r.created_at.tzinfo else r.created_at.replace(tzinfo=timezone.utc)  # stored as UTC
            if (since is not None and when < since) or (until is not None and when > until):
                continue
            ids = [g.id for g in comp.generations]
            scores = {}
            for gid, attrs in (r.scores or {}).items():
                if int(gid) in ids:
                    scores[ids.index(int(gid))] = dict(attrs)
            out.append(RatedComparison(comp.id, comp.prompt, pset, when, bool(r.blind), r.outcome,
                                       [source_of(g.label) for g in comp.generations],
                                       ids.index(r.winner_id) if r.winner_id in ids else None, scores))
    return out


def games_of(comparisons: Iterable[RatedComparison]) -> list[Game]:
    games = []
    for c in comparisons:
        for i in range(len(c.sources)):
            for j in range(i + 1, len(c.sources)):
                if c.sources[i] == c.sources[j]:
                    continue
                if c.outcome == "winner":
                    if c.winner not in (i, j):
                        continue  # neither won: the winner was a third column, which beat both
                    score = 1.0 if c.winner == i else 0.0
                else:
                    score = 0.5
                games.append(Game(c.sources[i], c.sources[j], score, c.blind, c.comparison_id))
    return games


def wilson_interval(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion ``p`` over ``n`` trials (a tie counts half a win)."""
    if n == 0:
        return (0.0, 1.0)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def bradley_terry(games: list[Game], reference: Optional[str] = None, prior_sd: float = BT_PRIOR_SD,
                  iterations: int = 100) -> dict[str, dict]:
    """Strengths s with P(a beats b) = sigmoid(s_a - s_b), ties as half a win each, fitted by Newton's method on
    the log-likelihood plus a Gaussian prior N(0, prior_sd^2) on each strength (so a source that won every game
    stays finite). Reported relative to ``reference`` (default: 'base' if it played, else the source with most
    games), with 95% intervals from the inverse Hessian (a Laplace approximation)."""
    names = sorted({g.a for g in games} | {g.b for g in games})
    if not names:
        return {}
    idx = {n: i for i, n in enumerate(names)}
    a = torch.tensor([idx[g.a] for g in games], dtype=torch.long)
    b = torch.tensor([idx[g.b] for g in games], dtype=torch.long)
    y = torch.tensor([g.score for g in games], dtype=torch.float64)
    k = len(names)
    s = torch.zeros(k, dtype=torch.float64)
    eye = torch.eye(k, dtype=torch.float64)
    d = eye[a] - eye[b]  # [games, k]
    prec = 1.0 / prior_sd ** 2
    for _ in range(iterations):
        p = torch.sigmoid(d @ s)
        grad = d.T @ (y - p) - prec * s
        hess = (d.T * (p * (1 - p))) @ d + prec * eye
        step = torch.linalg.solve(hess, grad)
        s = s + step
        if float(step.abs().max()) < 1e-10:
            break
    p = torch.sigmoid(d @ s)
    cov = torch.linalg.inv((d.T * (p * (1 - p))) @ d + prec * eye)
    if reference is None or reference not in idx:
        counts = {n: sum(1 for g in games if n in (g.a, g.b)) for n in names}
        reference = "base" if "base" in idx else max(names, key=lambda n: (counts[n], n))
    r = idx[reference]
    out = {}
    for n, i in idx.items():
        value = float(s[i] - s[r])
        var = float(cov[i, i] + cov[r, r] - 2 * cov[i, r]) if i != r else 0.0
        half = Z95 * math.sqrt(max(var, 0.0))
        out[n] = {"strength": value, "interval": [value - half, value + half], "reference": reference}
    return out


def summarize(comparisons: list[RatedComparison]) -> dict:
    """The numbers for one group of ratings (see the module docstring)."""
    games = games_of(comparisons)
    sources: dict[str, dict] = {}
    for c in comparisons:
        for s in c.sources:
            sources.setdefault(s, {"wins": 0, "ties": 0, "losses": 0, "both_bad": 0, "games": 0, "comparisons": 0})
        for s in set(c.sources):
            sources[s]["comparisons"] += 1
            if c.outcome == "both_bad":
                sources[s]["both_bad"] += 1
    for g in games:
        for name, score in ((g.a, g.score), (g.b, 1.0 - g.score)):
            e = sources[name]
            e["games"] += 1
            e["wins" if score == 1.0 else "ties" if score == 0.5 else "losses"] += 1
    for e in sources.values():
        n = e["games"]
        e["win_rate"] = (e["wins"] + 0.5 * e["ties"]) / n if n else None
        e["interval"] = list(wilson_interval(e["win_rate"], n)) if n else None
    strengths = bradley_terry(games)
    for name, e in sources.items():
        e["bradley_terry"] = strengths.get(name)
    attributes: dict[str, dict[str, dict]] = {}
    for c in comparisons:
        for col, attrs in c.scores.items():
            for attr, v in attrs.items():
                a = attributes.setdefault(c.sources[col], {}).setdefault(attr, {"sum": 0.0, "n": 0})
                a["sum"] += v
                a["n"] += 1
    for per in attributes.values():
        for a in per.values():
            a["mean"] = a.pop("sum") / a["n"]
    return {"comparisons": len(comparisons), "games": len(games), "sources": sources, "attributes": attributes}


def ratings_report(store, session_id: Optional[int] = None, prompt_set: Optional[str] = None,
                   since: Optional[datetime] = None, until: Optional[datetime] = None) -> dict:
    """``summarize`` for all ratings, the blind ones and the unblind ones."""
    comps = rated_comparisons(store, session_id, prompt_set, since, until)
    return {"filters": {"session": session_id, "prompt_set": prompt_set,
                        "since": since.isoformat() if since else None, "until": until.isoformat() if until else None},
            "all": summarize(comps), "blind": summarize([c for c in comps if c.blind]),
            "unblind": summarize([c for c in comps if not c.blind])}


def parse_date(text: str, option: str) -> datetime:
    """A date (2026-12-01) or a date and time, read as UTC."""
    try:
        d = datetime.fromisoformat(text)
    except ValueError as exc:
        raise RatingsError(f"{option}: {text!r} is not a date; write it as YYYY-MM-DD or YYYY-MM-DDTHH:MM.") from exc
    return d if d.tzinfo else d.replace(tzinfo=timezone.utc)


def report_text(report: dict) -> str:
    """The report as plain-text tables (the CLI's output)."""
    lines = []
    for group in ("all", "blind", "unblind"):
        r = report[group]
        lines.append(f"{group} ratings: {r['comparisons']} comparisons, {r['games']} games")
        if not r["sources"]:
            lines.append("  (none)")
            continue
        lines.append(f"  {'source':<28} {'wins':>5} {'ties':>5} {'losses':>6} {'win rate':>9} {'95% interval':>15} "
                     f"{'Bradley-Terry':>14} {'95% interval':>17}")
        order = sorted(r["sources"], key=lambda n: -(r["sources"][n]["win_rate"] or 0))
        for name in order:
            e = r["sources"][name]
            wr = "-" if e["win_rate"] is None else f"{e['win_rate']:.3f}"
            iv = "-" if e["interval"] is None else f"{e['interval'][0]:.3f}-{e['interval'][1]:.3f}"
            bt = e["bradley_terry"]
            bts = "-" if bt is None else f"{bt['strength']:+.3f}"
            bti = "-" if bt is None else f"{bt['interval'][0]:+.2f} to {bt['interval'][1]:+.2f}"
            lines.append(f"  {name:<28} {e['wins']:>5} {e['ties']:>5} {e['losses']:>6} {wr:>9} {iv:>15} {bts:>14} {bti:>17}")
        ref = next((e["bradley_terry"]["reference"] for e in r["sources"].values() if e["bradley_terry"]), None)
        if ref:
            lines.append(f"  (Bradley-Terry strengths relative to {ref}; ties count half)")
        for name, attrs in r["attributes"].items():
            lines.append(f"  scores of {name}: " + ", ".join(f"{a} {v['mean']:.2f} (n={v['n']})" for a, v in attrs.items()))
    return "\n".join(lines) + "\n"


def ratings_csv(comparisons: list[RatedComparison]) -> str:
    """One row per rated column: comparison, prompt, prompt set, time, blind, outcome, source, whether it won, and
    its attribute scores (one column per attribute)."""
    attrs = sorted({a for c in comparisons for s in c.scores.values() for a in s})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["comparison_id", "prompt", "prompt_set", "rated_at", "blind", "outcome", "column", "source", "won", *attrs])
    for c in comparisons:
        for i, s in enumerate(c.sources):
            won = "" if c.outcome != "winner" else int(c.winner == i)
            w.writerow([c.comparison_id, c.prompt, c.prompt_set or "", c.created_at.isoformat(), int(c.blind), c.outcome,
                        i + 1, s, won, *[c.scores.get(i, {}).get(a, "") for a in attrs]])
    return buf.getvalue()


def win_rate_bars(report: dict, width: float = 0.38) -> tuple[list[str], list[tuple[str, list, list, list, list]]]:
    """What a bar chart of the win rates draws: the sources (one tick each) and, for the blind and the unblind
    ratings, each bar's x, height and the interval's distance below and above it."""
    names = sorted(report["all"]["sources"])
    groups = []
    for k, group in enumerate(("blind", "unblind")):
        srcs = report[group]["sources"]
        xs, ys, lo, hi = [], [], [], []
        for i, n in enumerate(names):
            e = srcs.get(n)
            if e and e["win_rate"] is not None:
                xs.append(i + (k - 0.5) * width)
                ys.append(e["win_rate"])
                lo.append(e["win_rate"] - e["interval"][0])
                hi.append(e["interval"][1] - e["win_rate"])
        groups.append((group, xs, ys, lo, hi))
    return names, groups


def plot_report(report: dict, path) -> None:
    """A bar chart of the win rates with their 95% intervals, blind and unblind side by side (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.38
    names, groups = win_rate_bars(report, width)
    if not names:
        raise RatingsError("There are no ratings to plot yet.")
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(names) + 2), 3.6), dpi=120)
    for (group, xs, ys, lo, hi), colour in zip(groups, ("#3b6fb6", "#d98a2b")):
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, color=colour,
               label=f"{group} ({report[group]['comparisons']} comparisons)")
    ax.axhline(0.5, color="#888", lw=0.8, ls="--")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate (ties half), 95% interval")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
