import csv
import json
import math

import pytest

from engine.data import length_balanced_pairs, length_pairs, load_pairs
from engine.errors import DataError


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_demo_ultrafeedback(demo_data):
    ps = load_pairs(demo_data / "ultrafeedback_helpfulness_400.jsonl")
    assert (ps.format, ps.objective) == ("ultrafeedback", "helpfulness")
    assert len(ps) + len(ps.problems) == 400
    assert all(p.kind == "skipped" and "tie" in p.reason for p in ps.problems if "score" in p.reason)
    assert len(ps) > 300
    assert ps.pairs[0].prompt[0]["role"] == "user"


def test_demo_hh_rlhf_split_at_last_assistant_turn(demo_data):
    ps = load_pairs(demo_data / "hh_rlhf_harmless_600.jsonl")
    assert (ps.format, ps.objective) == ("hh-rlhf", "harmlessness")
    assert len(ps) + len(ps.problems) == 600
    first = json.loads((demo_data / "hh_rlhf_harmless_600.jsonl").open().readline())
    pair = ps.pairs[0]
    assert first["chosen"].endswith(pair.chosen)
    assert first["rejected"].endswith(pair.rejected)
    assert pair.prompt[-1]["role"] == "user"
    assert [m["role"] for m in pair.prompt][:2] == ["user", "assistant"] or len(pair.prompt) == 1
    assert any(len(p.prompt) > 1 for p in ps.pairs)


@pytest.mark.parametrize("name, fmt, rows", [("ultrafeedback_length_matched_1.25.jsonl", "ultrafeedback", 184),
                                             ("hh_rlhf_harmless_length_matched_1.25.jsonl", "hh-rlhf", 251)])
def test_shipped_length_matched_subsets_are_what_their_name_says(demo_data, name, fmt, rows):
    """The demo helpfulness and harmlessness directions train on these: every pair within 25% in length, neither
    the longer nor the shorter reply preferred in most pairs, and the filter keeps all of them."""
    ps = load_pairs(demo_data / name)
    assert (ps.format, len(ps), len(ps.problems)) == (fmt, rows, 0)
    assert all(max(len(p.chosen), len(p.rejected)) <= 1.25 * min(len(p.chosen), len(p.rejected)) for p in ps.pairs)
    assert len(load_pairs(demo_data / name, length_matched=1.25)) == rows
    shorter = sum(len(p.chosen) < len(p.rejected) for p in ps.pairs) / rows
    assert 0.35 < shorter < 0.65


@pytest.mark.parametrize("name, fmt, rows", [("ultrafeedback_length_balanced_2.jsonl", "ultrafeedback", 354),
                                             ("hh_rlhf_harmless_length_balanced_2.jsonl", "hh-rlhf", 728)])
def test_shipped_length_balanced_subsets_are_what_their_name_says(demo_data, name, fmt, rows):
    """The demo helpfulness and harmlessness directions train on these: within 2x in length, as many pairs with the
    longer reply preferred as with the shorter, and balancing them again keeps every pair."""
    ps = load_pairs(demo_data / name)
    assert (ps.format, len(ps), len(ps.problems)) == (fmt, rows, 0)
    longer = sum(len(p.chosen.strip()) > len(p.rejected.strip()) for p in ps.pairs)
    shorter = sum(len(p.chosen.strip()) < len(p.rejected.strip()) for p in ps.pairs)
    assert longer == shorter and rows - longer - shorter <= 10
    assert len(load_pairs(demo_data / name, length_balanced=2)) == rows


def test_trl_strings_and_messages(tmp_path):
    f = _jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."},
        {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}],
         "chosen": [{"role": "assistant", "content": "Hello there."}],
         "rejected": [{"role": "assistant", "content": "What."}]},
    ])
    ps = load_pairs(f)
    assert ps.format == "trl" and ps.objective == "p"
    assert [p.chosen for p in ps] == ["Hello!", "Hello there."]
    assert ps.pairs[1].prompt[0] == {"role": "system", "content": "Be kind."}


def test_trl_implicit_prompt(tmp_path):
    conv = [{"role": "user", "content": "Name a color."}]
    f = _jsonl(tmp_path / "p.jsonl", [{"chosen": conv + [{"role": "assistant", "content": "Blue."}],
                                       "rejected": conv + [{"role": "assistant", "content": "No."}]}])
    ps = load_pairs(f)
    assert ps.format == "trl" and ps.pairs[0].prompt == conv and ps.pairs[0].chosen == "Blue."


def test_ultrafeedback_h4_messages(tmp_path):
    user = {"role": "user", "content": "2+2?"}
    f = _jsonl(tmp_path / "uf.jsonl", [
        {"prompt": "2+2?", "prompt_id": "a", "score_chosen": 9.0, "score_rejected": 3.0,
         "chosen": [user, {"role": "assistant", "content": "4"}], "rejected": [user, {"role": "assistant", "content": "5"}]},
        {"prompt": "1+1?", "prompt_id": "b", "score_chosen": 5.0, "score_rejected": 5.0,
         "chosen": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}],
         "rejected": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "two"}]},
    ])
    ps = load_pairs(f)
    assert ps.format == "ultrafeedback" and len(ps) == 1 and ps.pairs[0].chosen == "4"
    assert ps.problems[0].kind == "skipped" and ps.problems[0].line == 2


def test_helpsteer_pairs_per_attribute_ties_dropped(tmp_path):
    rows = [
        {"prompt": "Explain tides.", "response": "The moon pulls the sea.", "helpfulness": 3, "correctness": 3, "coherence": 4, "complexity": 1, "verbosity": 1},
        {"prompt": "Explain tides.", "response": "Tides are caused by the gravity of the moon and sun acting on oceans.", "helpfulness": 4, "correctness": 3, "coherence": 4, "complexity": 2, "verbosity": 2},
        {"prompt": "Explain tides.", "response": "Water.", "helpfulness": 0, "correctness": 1, "coherence": 2, "complexity": 0, "verbosity": 0},
        {"prompt": "Say hi.", "response": "Hi!", "helpfulness": 4, "correctness": 4, "coherence": 4, "complexity": 0, "verbosity": 0},
        {"prompt": "Say hi.", "response": "Hello there!", "helpfulness": 4, "correctness": 4, "coherence": 4, "complexity": 0, "verbosity": 1},
    ]
    f = _jsonl(tmp_path / "hs.jsonl", rows)
    help_ = load_pairs(f)
    assert help_.format == "helpsteer" and help_.objective == "helpfulness"
    assert len(help_) == 3  # 3 pairs for tides, the 'Say hi.' tie is dropped
    assert all(p.prompt[-1]["content"] == "Explain tides." for p in help_)
    assert {(p.chosen[:5], p.rejected[:5]) for p in help_} == {("Tides", "The m"), ("Tides", "Water"), ("The m", "Water")}
    corr = load_pairs(f, attribute="correctness")
    assert len(corr) == 2  # the two correctness-3 responses tie
    verb = load_pairs(f, objective="verbosity")  # length-built, from every response pair of a prompt
    assert len(verb) == 4 and all(len(p.chosen) > len(p.rejected) for p in verb)


def test_csv_with_message_cells_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "chosen", "rejected"])
        w.writerow(["Hi?", "Hello!", "No."])
        w.writerow([json.dumps([{"role": "user", "content": "Yo?"}]), "Hey.", "Bye."])
        w.writerow(["Only two cells", "x"])
    ps = load_pairs(path, format="trl")
    assert len(ps) == 2 and ps.pairs[1].prompt == [{"role": "user", "content": "Yo?"}]
    malformed = [p for p in ps.problems if p.kind == "malformed"]
    assert [p.line for p in malformed] == [4] and "rejected" in malformed[0].reason
    pq.write_table(pa.Table.from_pylist([{"prompt": "a?", "chosen": "yes", "rejected": "no"}]), tmp_path / "p.parquet")
    assert load_pairs(tmp_path / "p.parquet").pairs[0].chosen == "yes"


def test_datasets_folder(tmp_path):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", [{"prompt": f"q{i}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)])
    ps = load_pairs(str(folder))
    assert len(ps) == 5 and ps.format == "trl"


def test_unreachable_dataset_name_is_a_clear_error():
    with pytest.raises(DataError, match="Could not load dataset 'nobody/nothing'"):
        load_pairs("nobody/nothing")


def test_malformed_rows_are_reported_with_line_numbers(tmp_path):
    f = _jsonl(tmp_path / "p.jsonl", [
        {"prompt": "a", "chosen": "yes", "rejected": "no"},
        '{"prompt": "b", "chosen": "yes", ',  # line 2: broken JSON
        {"prompt": "c", "chosen": "yes"},  # line 3: no rejected
        {"prompt": "d", "chosen": "", "rejected": "no"},  # line 4: empty
        {"prompt": "e", "chosen": "same", "rejected": "same"},  # line 5: identical
        {"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"},  # line 6
    ])
    ps = load_pairs(f, format="trl")
    assert len(ps) == 1
    reasons = {p.line: p.reason for p in ps.problems}
    assert set(reasons) == {2, 3, 4, 5, 6}
    assert "not valid JSON" in reasons[2] and "rejected" in reasons[3] and "empty" in reasons[4]
    assert "identical" in reasons[5] and "role" in reasons[6]


def test_no_usable_rows_is_an_error(tmp_path):
    f = _jsonl(tmp_path / "p.jsonl", [{"prompt": "c", "chosen": "yes"}] * 3)
    with pytest.raises(DataError, match=r"no usable trl pairs \(3 malformed rows, e.g. line 1: missing column 'rejected'"):
        load_pairs(f, format="trl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no rows"):
        load_pairs(tmp_path / "empty.jsonl")
    _jsonl(tmp_path / "odd.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match="Could not tell the data format"):
        load_pairs(tmp_path / "odd.jsonl")
    with pytest.raises(DataError, match="unsupported file type"):
        (tmp_path / "x.xlsx").write_text("x")
        load_pairs(tmp_path / "x.xlsx")


def test_length_builders(tmp_path):
    f = _jsonl(tmp_path / "p.jsonl", [
        {"prompt": "a", "chosen": "short", "rejected": "a much much longer answer"},
        {"prompt": "b", "chosen": "a very long and winding reply", "rejected": "brief"},
        {"prompt": "c", "chosen": "abcdefghijkl", "rejected": "abcdefghijklm"},  # 8% apart: dropped
    ])
    verb = load_pairs(f, objective="verbosity")
    assert verb.objective == "verbosity" and len(verb) == 2
    assert all(len(p.chosen) > len(p.rejected) for p in verb)
    conc = length_pairs(load_pairs(f), longer=False)
    assert conc.objective == "conciseness" and all(len(p.chosen) < len(p.rejected) for p in conc)


def test_split_is_deterministic_and_order_independent(demo_data):
    ps = load_pairs(demo_data / "ultrafeedback_helpfulness_400.jsonl", limit=200)
    tr, va = ps.split(0.2, seed=3)
    assert len(tr) + len(va) == 200 and len(va) == 40
    tr2, va2 = ps.split(0.2, seed=3)
    assert [p.key() for p in va] == [p.key() for p in va2]
    shuffled = type(ps)(ps.objective, list(reversed(ps.pairs)))
    assert {p.key() for p in shuffled.split(0.2, seed=3)[1]} == {p.key() for p in va}
    assert {p.key() for p in ps.split(0.2, seed=4)[1]} != {p.key() for p in va}
    assert {p.key() for p in tr}.isdisjoint(p.key() for p in va)


def test_limit_and_hash(demo_data):
    ps = load_pairs(demo_data / "hh_rlhf_harmless_600.jsonl", limit=100)
    assert len(ps) == 100
    assert ps.data_hash() == load_pairs(demo_data / "hh_rlhf_harmless_600.jsonl", limit=100).data_hash()
    assert ps.data_hash() != ps.limit(99).data_hash()


def test_length_matched_pairs_keep_only_responses_of_similar_length(demo_data, tmp_path):
    uf = demo_data / "ultrafeedback_helpfulness_400.jsonl"
    every = load_pairs(uf)
    matched = load_pairs(uf, length_matched=1.2)
    ratio = lambda p: max(len(p.chosen.strip()), len(p.rejected.strip())) / max(min(len(p.chosen.strip()), len(p.rejected.strip())), 1)
    assert all(ratio(p) <= 1.2 for p in matched)
    assert [p.line for p in matched] == [p.line for p in every if ratio(p) <= 1.2]  # the same pairs, in file order
    assert 0 < len(matched) < len(every) and "length-matched within 1.2x" in matched.source
    assert len(load_pairs(uf, length_matched=1.2, limit=10)) == 10  # the limit counts matched pairs
    with pytest.raises(DataError, match="1 or more"):
        load_pairs(uf, length_matched=0.8)
    with pytest.raises(DataError, match="cannot also be length-matched"):
        load_pairs(uf, objective="verbosity", length_matched=1.2)
    uneven = tmp_path / "uneven.jsonl"
    uneven.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello!", "rejected": "Hello there, how are you today?"}) + "\n")
    with pytest.raises(DataError, match="None of the 1 pairs .* within a length ratio of 1.2; use a larger ratio"):
        load_pairs(uneven, length_matched=1.2)


def _ratio(p):
    a, b = max(len(p.chosen.strip()), 1), max(len(p.rejected.strip()), 1)
    return max(a, b) / min(a, b)


def test_length_balanced_pairs_leave_nothing_to_learn_from_length(demo_data, tmp_path):
    """As many pairs with the longer reply preferred as with the shorter, each side's length differences alike,
    every pair within the ratio, in file order; more pairs than a tight length match keeps."""
    uf = demo_data / "ultrafeedback_helpfulness_400.jsonl"
    every = load_pairs(uf)
    bal = load_pairs(uf, length_balanced=2)
    longer = [p for p in bal if len(p.chosen.strip()) > len(p.rejected.strip())]
    shorter = [p for p in bal if len(p.chosen.strip()) < len(p.rejected.strip())]
    ties = [p for p in bal if len(p.chosen.strip()) == len(p.rejected.strip())]
    assert len(longer) == len(shorter) > 0 and len(longer) + len(shorter) + len(ties) == len(bal)
    assert all(_ratio(p) <= 2 for p in bal)
    lines = [p.line for p in bal]
    assert lines == sorted(lines) and set(lines) <= {p.line for p in every}
    # the smaller side is kept whole; the larger side's picks are its nearest in size, so the two sides' sorted
    # log ratios differ far less than a random pick of the larger side would
    within = [p for p in every if _ratio(p) <= 2 and len(p.chosen.strip()) != len(p.rejected.strip())]
    n_longer = sum(len(p.chosen.strip()) > len(p.rejected.strip()) for p in within)
    assert n_longer != len(within) - n_longer  # the demo data is not balanced to begin with
    gaps = [abs(math.log(_ratio(a)) - math.log(_ratio(b))) for a, b in
            zip(sorted(longer, key=_ratio), sorted(shorter, key=_ratio))]
    assert max(gaps) < 0.05
    assert len(bal) > 1.5 * len(load_pairs(uf, length_matched=1.25))
    assert "length-balanced within 2x" in bal.source and f"preferred in {len(longer)}" in bal.source
    with pytest.raises(DataError, match="1 or more"):
        load_pairs(uf, length_balanced=0.5)
    with pytest.raises(DataError, match="cannot also be length-balanced"):
        load_pairs(uf, objective="verbosity", length_balanced=2)
    with pytest.raises(DataError, match="not both"):
        load_pairs(uf, length_balanced=2, length_matched=1.2)
    onesided = _jsonl(tmp_path / "onesided.jsonl", [{"prompt": "Hi", "chosen": "Hello there!", "rejected": "Hello"}])
    with pytest.raises(DataError, match="None of the 1 pairs .* balanced .* within a length ratio of 3"):
        load_pairs(onesided, length_balanced=3)


def test_length_balanced_matching_picks_the_nearest_of_the_larger_side():
    from engine.data import Pair, PairSet

    def pair(chosen, rejected, line):
        return Pair([{"role": "user", "content": "q"}], "x" * chosen, "x" * rejected, line)

    # longer preferred: ratios 1.1, 1.5, 1.9, 1.3; shorter preferred: 1.5 and 1.2; a tie
    ps = PairSet("helpfulness", [pair(110, 100, 1), pair(150, 100, 2), pair(190, 100, 3), pair(100, 150, 4),
                                 pair(100, 100, 5), pair(130, 100, 6), pair(100, 120, 7), pair(500, 100, 8)])
    kept = length_balanced_pairs(ps, 2.0)
    # 1.2 takes 1.3 (as far as 1.1 in characters, nearer in log ratio), 1.5 takes 1.5; 1.1 and 1.9 are left over;
    # the 5x pair is outside the ratio; the tie stays
    assert [p.line for p in kept] == [2, 4, 5, 6, 7]


def test_min_score_gap_keeps_the_clearly_rated_pairs_before_the_length_selection(demo_data, tmp_path):
    """UltraFeedback pairs carry score_chosen - score_rejected; --min-score-gap keeps those rated at least that far
    apart, in file order, and the length selections then work on what is left."""
    uf = demo_data / "ultrafeedback_helpfulness_400.jsonl"
    rows = {n: json.loads(line) for n, line in enumerate(uf.open(), 1)}
    gap = {n: r["metadata"]["score_chosen"] - r["metadata"]["score_rejected"] for n, r in rows.items()}
    every = load_pairs(uf)
    assert all(p.score_gap == gap[p.line] for p in every)
    clear = load_pairs(uf, min_score_gap=2)
    assert [p.line for p in clear] == [p.line for p in every if gap[p.line] >= 2]
    assert 0 < len(clear) < len(every) and "score gap 2 or more" in clear.source
    assert clear.stats()["score_gap_median"] >= 2
    # balancing works on the clear pairs: what it keeps is clear, and balanced
    both = load_pairs(uf, min_score_gap=2, length_balanced=2)
    assert all(gap[p.line] >= 2 for p in both)
    assert set(p.line for p in both) == set(p.line for p in length_balanced_pairs(clear, 2))
    n_longer = sum(len(p.chosen.strip()) > len(p.rejected.strip()) for p in both)
    assert n_longer == sum(len(p.chosen.strip()) < len(p.rejected.strip()) for p in both) > 0
    # the filter never changes which side of the split a pair falls on
    assert {p.line for p in clear.split(0.35, 0)[1]} == {p.line for p in every.split(0.35, 0)[1] if gap[p.line] >= 2}

    with pytest.raises(DataError, match="above 0"):
        load_pairs(uf, min_score_gap=0)
    with pytest.raises(DataError, match="carry no scores; drop --min-score-gap"):
        load_pairs(uf, objective="verbosity", min_score_gap=1)
    with pytest.raises(DataError, match=r"has a score gap of 9 or more \(the largest is [0-8]"):
        load_pairs(uf, min_score_gap=9)
    with pytest.raises(DataError, match="carries no scores .*hh-rlhf"):
        load_pairs(demo_data / "hh_rlhf_harmless_600.jsonl", min_score_gap=1)
    unrated = _jsonl(tmp_path / "trl.jsonl", [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}])
    with pytest.raises(DataError, match="carries no scores"):
        load_pairs(unrated, min_score_gap=1)


def test_helpsteer_pairs_carry_their_score_gap(tmp_path):
    rows = [{"prompt": "Explain tides.", "response": r, "helpfulness": h, "correctness": 2, "coherence": 4,
             "complexity": 1, "verbosity": 1} for r, h in (("The moon.", 1), ("Gravity of moon and sun.", 4),
                                                           ("Water.", 0))]
    f = _jsonl(tmp_path / "hs.jsonl", rows)
    gaps = {(p.chosen, p.rejected): p.score_gap for p in load_pairs(f)}
    assert gaps == {("Gravity of moon and sun.", "The moon."): 3, ("Gravity of moon and sun.", "Water."): 4,
                    ("The moon.", "Water."): 1}
    assert [(p.chosen, p.rejected) for p in load_pairs(f, min_score_gap=3)] == [
        ("Gravity of moon and sun.", "The moon."), ("Gravity of moon and sun.", "Water.")]
