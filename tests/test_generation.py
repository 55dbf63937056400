import pytest

from engine.errors import TsdpoError
from engine.generation import SamplingParams, generate
from engine.progress import CancelToken


def test_streamed_pieces_make_the_final_text(tiny_lm):
    pieces = []
    result = generate(tiny_lm, "Tell me about the sea.", SamplingParams(max_new_tokens=24), on_text=pieces.append)
    assert result.n_tokens > 0 and not result.stopped
    assert "".join(pieces) == result.text
    assert result.tokens_per_s > 0


def test_stop_ends_generation_within_one_step(tiny_lm):
    stop = CancelToken()
    pieces = []

    def on_text(piece):
        pieces.append(piece)
        stop.set()

    result = generate(tiny_lm, "Tell me a long story.", SamplingParams(max_new_tokens=200), on_text=on_text, stop=stop)
    assert result.stopped
    assert result.n_tokens <= 2, result.n_tokens


def test_sampling_is_reproducible_by_seed(tiny_lm):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=11)
    a = generate(tiny_lm, "Write a poem.", params)
    b = generate(tiny_lm, "Write a poem.", params)
    c = generate(tiny_lm, "Write a poem.", SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=12))
    assert a.text == b.text
    assert a.text != c.text


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0),
                                 dict(repetition_penalty=0.0)])
def test_bad_sampling_parameters(tiny_lm, bad):
    with pytest.raises(TsdpoError):
        generate(tiny_lm, "hi", SamplingParams(**bad))
