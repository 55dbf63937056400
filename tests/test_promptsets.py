"""Prompt sets: reading them, running them through columns into the session, and `tsdpo eval`."""

import json

import pytest

from engine.cli import main
from engine.errors import Cancelled
from engine.generation import Column, SamplingParams
from engine.mixer import Mixer
from engine.models import load_model
from engine.progress import CancelToken
from engine.promptsets import PromptSetError, read_prompt_set, run_prompt_set, with_system
from engine.store import Store


def test_prompt_sets_read_from_jsonl_csv_and_txt(tmp_path):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Say hi."}, {"prompt": chat}, {"messages": chat[1:]}]) + "\n\n")
    ps = read_prompt_set(tmp_path / "a.jsonl")
    assert ps.name == "a" and ps.prompts == ["Say hi.", chat, chat[1:]]
    (tmp_path / "b.csv").write_text('id,prompt\n1,"Why, though?"\n2,Plain\n')
    assert read_prompt_set(tmp_path / "b.csv").prompts == ["Why, though?", "Plain"]
    (tmp_path / "c.txt").write_text("one\n\ntwo\nthree\n")
    assert read_prompt_set(tmp_path / "c.txt", limit=2, name="mine").prompts == ["one", "two"]
    assert read_prompt_set(tmp_path / "c.txt", name="mine").name == "mine"
    for body, says in (('{"prompt": "ok"}\n{"text": "no"}\n', "line 2: no 'prompt'"),
                       ('{"prompt": "ok"}\nnot json\n', "line 2: not JSON"),
                       (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
                        "the last message must be the user's"),
                       (json.dumps({"messages": [{"role": "robot", "content": "q"}]}), "needs a role")):
        (tmp_path / "bad.jsonl").write_text(body)
        with pytest.raises(PromptSetError, match=says):
            read_prompt_set(tmp_path / "bad.jsonl")
    with pytest.raises(PromptSetError, match="No prompt set at"):
        read_prompt_set(tmp_path / "nope.jsonl")


def test_a_system_prompt_goes_in_front_unless_the_prompt_has_its_own():
    assert with_system("q", None) == "q"
    assert with_system("q", "Be brief.") == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}]
    own = [{"role": "system", "content": "Mine."}, {"role": "user", "content": "q"}]
    assert with_system(own, "Be brief.") == own


def test_a_prompt_set_runs_through_the_columns_into_the_session(tiny_model_dir, tiny_vector, tmp_path):
    lm = load_model(tiny_model_dir)
    mixer = Mixer(lm)
    name = mixer.add(tiny_vector)
    store = Store(tmp_path / "s.db")
    sid = store.create_session("s", {"kind": "folder"}, lm.fingerprint).id
    (tmp_path / "p.txt").write_text("Say hi.\nName a colour.\nCount to three.\n")
    ps = read_prompt_set(tmp_path / "p.txt")
    columns = [Column("base"), Column("mix", {name: 0.8})]
    seen = []
    params = SamplingParams(max_new_tokens=6)
    result = run_prompt_set(lm, ps, columns, params, mixer=mixer, store=store, session_id=sid, system="Be brief.",
                            on_row=seen.append)
    assert [r.index for r in result.rows] == [0, 1, 2] and seen == result.rows and not result.stopped
    comps = store.history(sid)
    assert [c.params["prompt_set"] for c in comps] == ["p"] * 3 and [c.params["row"] for c in comps] == [0, 1, 2]
    assert json.loads(comps[0].prompt)[0] == {"role": "system", "content": "Be brief."}
    for r, c in zip(result.rows, comps):
        assert r.comparison_id == c.id and [g.label for g in c.generations] == ["base", "mix"]
        assert [col["text"] for col in r.columns] == [g.output for g in c.generations]
    # The same prompt and columns through compare() directly give the same replies (nothing about the set changes them).
    from engine.generation import compare
    again = compare(lm, with_system("Name a colour.", "Be brief."), columns, params, mixer=mixer)
    assert [cr.result.text for cr in again.columns] == [col["text"] for col in result.rows[1].columns]

    stop = CancelToken()
    first = []

    def stop_after_first(row):
        first.append(row)
        stop.set()

    stopped = run_prompt_set(lm, ps, columns, params, mixer=mixer, store=store, session_id=sid, on_row=stop_after_first,
                             stop=stop)
    assert stopped.stopped and len(stopped.rows) == 1 and len(store.history(sid)) == 4  # the finished row is kept
    stop.set()
    with pytest.raises(Cancelled):
        run_prompt_set(lm, ps, columns, params, mixer=mixer, stop=stop)


def test_cli_eval_runs_base_mixes_and_pins_and_the_ratings_filter_by_set(tiny_model_dir, tiny_vector, tmp_path, capsys):
    lm = load_model(tiny_model_dir)
    vec = tiny_vector.save(tmp_path / "vec.safetensors")
    db = tmp_path / "e.db"
    store = Store(db)
    sid = store.create_session("study", {"kind": "folder", "ref": str(tiny_model_dir)}, lm.fingerprint,
                               {"directions": [{"name": "v", "path": str(vec)}],
                                "plane": {"x": {"direction": "v", "scale": 1.0, "low": -1, "high": 1}}}).id
    store.pin_point(sid, "A", 0.5, 0.0, weights={"v": 0.7})
    store.pin_point(sid, "old", 0.5, 0.0)  # pinned before pins kept their mix: the plane gives it
    (tmp_path / "p.jsonl").write_text('{"prompt": "Say hi."}\n{"prompt": "Name a colour."}\n')
    out = tmp_path / "res.jsonl"
    args = ["eval", "--model", str(tiny_model_dir), "--db", str(db), "--session", str(sid), "--prompts",
            str(tmp_path / "p.jsonl"), "--column", "base", "--column", f"mix:{vec}=0.7", "--column", "pin:A",
            "--column", "pin:old", "--max-new-tokens", "5", "--system", "Be brief.", "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 2 and [c["label"] for c in rows[0]["columns"]] == ["base", "mix vec=+0.7", "pinned A", "pinned old"]
    texts = [c["text"] for c in rows[0]["columns"]]
    assert texts[1] == texts[2]  # the pin's stored mix is the same as the explicit one
    comps = store.history(sid)
    assert [c.params["prompt_set"] for c in comps] == ["p", "p"]
    assert store.session(sid).settings["system_prompt"] == "Be brief."
    assert comps[1].generations[2].weights == {"v": 0.7} and comps[1].generations[3].weights == {"v": 0.5}
    store.add_rating(comps[0].id, "winner", winner_id=comps[0].generations[2].id)
    assert main(["ratings", "--db", str(db), "--prompt-set", "p"]) == 0
    assert "pinned A" in capsys.readouterr().out
    assert main(args) == 2 and "exists" in capsys.readouterr().err
    head = args[:args.index("--column")]
    tail = ["--out", str(tmp_path / "x.jsonl")]
    for column, says in (("pin:nobody", "no pinned point 'nobody'"), ("weird", "--column takes")):
        assert main(head + ["--column", "base", "--column", column] + tail) == 2
        assert says in capsys.readouterr().err
    no_session = [a for a in head if a not in ("--session", str(sid))] + ["--column", "pin:A"] + tail
    assert main(no_session) == 2 and "give --session" in capsys.readouterr().err
    assert main(head + ["--column", "base"] * 5 + tail) == 2 and "1 to 4 columns" in capsys.readouterr().err
