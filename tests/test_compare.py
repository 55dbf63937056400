import pytest

from engine.errors import TsdpoError
from engine.generation import Column, SamplingParams, compare, generate
from engine.progress import CancelToken
from engine.mixer import Mixer
from engine.store import Store


@pytest.fixture
def mixer(tiny_lm, tiny_vector):
    m = Mixer(tiny_lm)
    m.add(tiny_vector, name="v")
    yield m
    m.clear()


def test_batched_columns_match_one_after_another(tiny_lm, mixer):
    cols = [Column("base"), Column("plus", {"v": 1.0}, (1.0, 0.0)), Column("minus", {"v": -1.0}, (-1.0, 0.0))]
    params = SamplingParams(max_new_tokens=16)
    batched = compare(tiny_lm, "Tell me about the sea.", cols, params, mixer=mixer)
    sequential = compare(tiny_lm, "Tell me about the sea.", cols, params, mixer=mixer, batched=False)
    assert batched.batched and not sequential.batched
    assert [c.result.text for c in batched.columns] == [c.result.text for c in sequential.columns]
    assert batched.columns[0].result.text == generate(tiny_lm, "Tell me about the sea.", params).text
    assert batched.columns[1].result.text != batched.columns[0].result.text


def test_same_seed_same_mix_same_sample(tiny_lm, mixer):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=5)
    comp = compare(tiny_lm, "Write a poem.", [Column("a", {"v": 0.5}), Column("b", {"v": 0.5}), Column("base")],
                   params, mixer=mixer)
    a, b, base = (c.result.text for c in comp.columns)
    assert a == b
    assert base == generate(tiny_lm, "Write a poem.", params).text


def test_streams_per_column_and_stores(tiny_lm, mixer, tmp_path):
    store = Store(tmp_path / "s.db")
    session = store.create_session("t", tiny_lm.source.to_json(), tiny_lm.fingerprint)
    pieces: dict[int, list[str]] = {0: [], 1: []}
    comp = compare(tiny_lm, "Hi there.", [Column("base"), Column("mix", {"v": 1.0}, (0.5, -0.25))],
                   SamplingParams(max_new_tokens=10, seed=3), mixer=mixer, store=store, session_id=session.id,
                   on_text=lambda i, p: pieces[i].append(p))
    for i, cr in enumerate(comp.columns):
        assert "".join(pieces[i]) == cr.result.text
    (row,) = store.history(session.id)
    assert row.id == comp.comparison_id and row.seed == 3 and row.params["max_new_tokens"] == 10
    mix = row.generations[1]
    assert (mix.label, mix.point_x, mix.point_y, mix.weights) == ("mix", 0.5, -0.25, {"v": 1.0})
    assert mix.output == comp.columns[1].result.text and mix.n_tokens == comp.columns[1].result.n_tokens


def test_stop_stops_every_column(tiny_lm, mixer):
    stop = CancelToken()
    comp = compare(tiny_lm, "Tell me a long story.", [Column("base"), Column("mix", {"v": 1.0})],
                   SamplingParams(max_new_tokens=300), mixer=mixer, stop=stop, on_text=lambda i, p: stop.set())
    assert all(c.result.n_tokens <= 2 and c.result.stopped for c in comp.columns)


def test_previous_mix_is_restored_and_limits(tiny_lm, mixer):
    mixer.set_weights({"v": 0.3})
    compare(tiny_lm, "Hi.", [Column("base"), Column("m", {"v": -1.0})], SamplingParams(max_new_tokens=4), mixer=mixer)
    assert mixer.rows == [{"v": 0.3}]
    with pytest.raises(TsdpoError, match="1 to 4 columns"):
        compare(tiny_lm, "Hi.", [Column("base")] * 5, mixer=mixer)
    with pytest.raises(TsdpoError, match="need a mixer"):
        compare(tiny_lm, "Hi.", [Column("m", {"v": 1.0})])


def test_word_diff_marks_the_words_that_differ():
    from studio.compare_panel import word_diff

    a = "The sky is blue because of Rayleigh scattering."
    b = "The sky is blue, mostly because of scattering."
    spans_a, spans_b = word_diff(a, b)
    assert [a[s:e] for s, e in spans_a] == ["blue", "Rayleigh"]
    assert [b[s:e] for s, e in spans_b] == ["blue, mostly"]  # "blue" became "blue," and "mostly" came in
    assert word_diff("same words here", "same words here") == ([], [])
    assert word_diff("", "new text") == ([], [(0, 8)])
