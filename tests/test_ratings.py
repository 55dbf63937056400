"""What the ratings add up to: win rates, Bradley-Terry strengths and intervals, checked by hand on a fixed set."""

import csv
import io
import json
import math

import pytest

from engine.cli import main
from engine.ratings import (BT_PRIOR_SD, bradley_terry, games_of, rated_comparisons, ratings_csv, ratings_report,
                            source_of, wilson_interval)
from engine.store import Store


def gen(label, text="reply", n=10):
    return {"label": label, "output": f"{text} from {label}", "n_tokens": n, "seconds": 0.1}


@pytest.fixture
def rated(tmp_path):
    """Nine comparisons, rated as listed (one unrated, one rated twice, one from the prompt set 'eval')."""
    store = Store(tmp_path / "r.db")
    sid = store.create_session("study", {"kind": "embedded"}).id
    plan = [  # (labels, outcome, winner column, blind, params, scores by column)
        (["base", "point (+0.50, +0.00)"], "winner", 1, True, {}, {}),
        (["base", "point (-0.30, +0.10)"], "winner", 1, True, {}, {}),
        (["base", "pinned A"], "winner", 0, True, {}, {}),
        (["base", "pinned A"], "tie", None, False, {}, {}),
        (["base", "point (+0.20, +0.20)", "pinned A"], "winner", 2, False, {}, {2: {"helpfulness": 4}, 0: {"helpfulness": 2}}),
        (["pinned A", "point (+0.10, +0.00)"], "both_bad", None, True, {}, {}),
        (["base", "point (+0.40, +0.00)"], "winner", 0, False, {}, {}),  # rated again below: the point wins
        (["base", "point (+0.40, +0.00)"], None, None, False, {}, {}),  # not rated
        (["base", "pinned A"], "winner", 1, True, {"prompt_set": "eval"}, {}),
    ]
    comps = []
    for labels, outcome, winner, blind, params, scores in plan:
        c = store.add_comparison(sid, f"prompt {len(comps)}", {"max_new_tokens": 10, **params}, 0, [gen(l) for l in labels])
        comps.append(c)
        if outcome:
            ids = [g.id for g in c.generations]
            store.add_rating(c.id, outcome, winner_id=ids[winner] if winner is not None else None, blind=blind,
                             scores={ids[k]: v for k, v in scores.items()})
    ids = [g.id for g in comps[6].generations]
    store.add_rating(comps[6].id, "winner", winner_id=ids[1])
    return store, sid


def test_sources_and_games_follow_the_rules(rated):
    store, sid = rated
    assert source_of("point (+0.50, -1.00)") == "point" and source_of("pinned A") == "pinned A"
    comps = rated_comparisons(store, sid)
    assert len(comps) == 8  # the unrated one is not there
    games = games_of(comps)
    # 1 + 1 + 1 + 1 + 2 (the third column beat both; base vs point is no game) + 1 + 1 + 1
    assert len(games) == 9
    seventh = [g for g in games if g.comparison_id == comps[6].comparison_id]
    assert [(g.a, g.b, g.score) for g in seventh] == [("base", "point", 0.0)]  # the latest rating counts


def test_the_report_matches_a_hand_count(rated):
    store, sid = rated
    r = ratings_report(store, sid)
    everyone = r["all"]["sources"]
    # By hand: base W1 T1 L5, the point W3 T1 L1, pinned A W3 T2 L1.
    assert {n: (e["wins"], e["ties"], e["losses"]) for n, e in everyone.items()} == {
        "base": (1, 1, 5), "point": (3, 1, 1), "pinned A": (3, 2, 1)}
    for name, (w, t, n) in {"base": (1, 1, 7), "point": (3, 1, 5), "pinned A": (3, 2, 6)}.items():
        p = (w + t / 2) / n
        assert everyone[name]["win_rate"] == pytest.approx(p)
        z = 1.959963984540054  # Wilson's interval written out
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        assert everyone[name]["interval"] == pytest.approx([centre - half, centre + half])
    assert everyone["pinned A"]["both_bad"] == 1 and everyone["base"]["both_bad"] == 0
    blind, unblind = r["blind"]["sources"], r["unblind"]["sources"]
    assert {n: (e["wins"], e["ties"], e["losses"]) for n, e in blind.items()} == {
        "base": (1, 0, 3), "point": (2, 1, 0), "pinned A": (1, 1, 1)}
    assert {n: (e["wins"], e["ties"], e["losses"]) for n, e in unblind.items()} == {
        "base": (0, 1, 2), "point": (1, 0, 1), "pinned A": (2, 1, 0)}
    assert r["all"]["attributes"] == {"pinned A": {"helpfulness": {"n": 1, "mean": 4.0}},
                                      "base": {"helpfulness": {"n": 1, "mean": 2.0}}}
    only_eval = ratings_report(store, sid, prompt_set="eval")["all"]
    assert only_eval["comparisons"] == 1 and only_eval["sources"]["pinned A"]["wins"] == 1


def test_bradley_terry_is_the_penalized_maximum_with_laplace_intervals(rated):
    """At the fit the gradient of the penalized log-likelihood is zero (checked term by term from the games), and an
    independent plain gradient ascent finds the same strengths."""
    store, sid = rated
    games = games_of(rated_comparisons(store, sid))
    fit = bradley_terry(games)
    assert fit["base"]["strength"] == 0.0 and fit["base"]["interval"] == [0.0, 0.0] and fit["base"]["reference"] == "base"
    names = sorted(fit)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    # The absolute strengths: the fit is relative to base, so recover base's own value from the prior's pull.
    s = {n: 0.0 for n in names}
    for _ in range(20000):  # plain gradient ascent on the same objective
        grad = {n: -s[n] / BT_PRIOR_SD ** 2 for n in names}
        for g in games:
            p = sig(s[g.a] - s[g.b])
            grad[g.a] += g.score - p
            grad[g.b] -= g.score - p
        for n in names:
            s[n] += 0.05 * grad[n]
    for n in names:
        assert fit[n]["strength"] == pytest.approx(s[n] - s["base"], abs=1e-6)
    assert fit["point"]["strength"] > 0 and fit["pinned A"]["strength"] > 0
    for n in ("point", "pinned A"):
        lo, hi = fit[n]["interval"]
        assert lo < fit[n]["strength"] < hi and hi - fit[n]["strength"] == pytest.approx(fit[n]["strength"] - lo)
    # A source that won every game stays finite.
    from engine.ratings import Game
    sweep = bradley_terry([Game("x", "base", 1.0, False, i) for i in range(5)])
    assert 0 < sweep["x"]["strength"] < 20


def test_wilson_interval_edges():
    assert wilson_interval(0.0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(1.0, 4)
    assert hi == pytest.approx(1.0) and 0.4 < lo < 0.6


def test_ratings_csv_has_a_row_per_rated_column(rated):
    store, sid = rated
    rows = list(csv.DictReader(io.StringIO(ratings_csv(rated_comparisons(store, sid)))))
    assert len(rows) == 2 * 7 + 3  # seven rated two-column comparisons and one of three
    third = [r for r in rows if r["prompt"] == "prompt 4"]
    assert [(r["source"], r["won"], r["helpfulness"]) for r in third] == [("base", "0", "2"), ("point", "0", ""),
                                                                           ("pinned A", "1", "4")]
    assert {r["prompt_set"] for r in rows} == {"", "eval"}


def test_cli_ratings_prints_and_writes_everything(rated, tmp_path, capsys):
    store, sid = rated
    db = str(store.path)
    out = {k: tmp_path / f"r.{k}" for k in ("json", "csv", "png", "jsonl")}
    args = ["ratings", "--db", db, "--session", str(sid), "--json-out", str(out["json"]), "--csv", str(out["csv"]),
            "--plot", str(out["png"]), "--trl", str(out["jsonl"])]
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "blind ratings: 5 comparisons" in printed and "relative to base" in printed
    report = json.loads(out["json"].read_text())
    assert report["all"]["sources"]["point"]["wins"] == 3
    assert out["png"].read_bytes()[:4] == b"\x89PNG" and out["csv"].read_text().startswith("comparison_id,")
    pairs = [json.loads(l) for l in out["jsonl"].read_text().splitlines()]
    assert len(pairs) == 7  # the winner over each other column: 1+1+1, 2 (three columns), 1 (the latest rating), 1
    assert main(args) == 2 and "exists" in capsys.readouterr().err
    assert main(["ratings", "--db", db, "--trl", str(tmp_path / "x.jsonl")]) == 2
    assert "--session" in capsys.readouterr().err
    assert main(["ratings", "--db", db, "--since", "yesterday"]) == 2
    assert "YYYY-MM-DD" in capsys.readouterr().err
    assert main(["ratings", "--db", db, "--since", "2999-01-01"]) == 0
    assert "(none)" in capsys.readouterr().out
    assert main(["sessions", "--db", db]) == 0 and "study" in capsys.readouterr().out


def test_the_trl_export_can_leave_out_cut_off_replies(tmp_path):
    from engine.store import ratings_to_trl

    store = Store(tmp_path / "t.db")
    sid = store.create_session("s", {"kind": "embedded"}).id
    c = store.add_comparison(sid, "p", {"max_new_tokens": 10}, 0, [gen("base", "a", 10), gen("pinned A", "b", 4)])
    store.add_rating(c.id, "winner", winner_id=c.generations[1].id)
    flagged = ratings_to_trl(store, sid)
    assert len(flagged) == 1 and flagged[0]["rejected_truncated"] is True
    assert ratings_to_trl(store, sid, exclude_truncated=True) == []
