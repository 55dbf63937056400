"""Low-rank directions as adapters: the same model as the merged weights, without touching them, and a mix per
batch row."""

import pytest
import torch

from engine.directions import DirectionError
from engine.generation import Column, SamplingParams, compare
from engine.mixer import Mixer
from tiny_model import random_tangent

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64]])


@torch.no_grad()
def logits(lm, ids=IDS):
    return lm.model(ids).logits


def _params(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


@pytest.mark.parametrize("k", [1, 2, 4])
def test_an_adapter_mix_is_the_merged_model_and_leaves_the_weights(tiny_lm, k):
    base = _params(tiny_lm)
    mixer = Mixer(tiny_lm)
    weights = {}
    for i in range(k):
        name = mixer.add(random_tangent(tiny_lm, f"d{i}", seed=10 + i, scale=0.3), name=f"d{i}")
        weights[name] = [0.9, -0.6, 0.35, -1.2][i]  # mixed signs
    mixer.set_weights(weights)
    assert mixer.active and not mixer.merged
    for n, p in tiny_lm.model.named_parameters():  # the weights are untouched: the adapter adds beside them
        assert torch.equal(p, base[n]), n
    via_adapter = logits(tiny_lm)
    mixer.set_row_weights([weights], merge=True)
    merged = logits(tiny_lm)
    assert mixer.merged and float((via_adapter - merged).abs().max()) <= 1e-5
    assert float((merged - logits_at_base(tiny_lm, mixer)).abs().max()) > 1e-2  # the mix does change the model
    mixer.clear()
    for n, p in tiny_lm.model.named_parameters():
        assert torch.equal(p, base[n]), n
    assert not mixer.active and not any(m._forward_hooks for m in tiny_lm.model.modules() if isinstance(m, torch.nn.Linear))


def logits_at_base(lm, mixer):
    with lm.at_base():
        return logits(lm)


def test_each_batch_row_carries_its_own_mix(tiny_lm, tiny_vector):
    mixer = Mixer(tiny_lm)
    mixer.add(random_tangent(tiny_lm, "a", seed=1, scale=0.3), name="a")
    mixer.add(random_tangent(tiny_lm, "b", seed=2, scale=0.3), name="b")
    mixer.add(tiny_vector, name="s")
    rows = [{}, {"a": 0.8, "b": -0.5}, {"a": -0.4, "s": 1.0}]
    assert mixer.batches(rows) == [[0, 1, 2]]
    ids = IDS.repeat(3, 1)
    with mixer.applied(rows):
        together = logits(tiny_lm, ids)
    for i, row in enumerate(rows):
        with mixer.applied([row]):
            alone = logits(tiny_lm)
        assert float((together[i] - alone[0]).abs().max()) <= 1e-5, row
    assert not mixer.active


def test_full_rank_directions_split_the_batches_and_low_rank_ones_do_not(tiny_lm):
    mixer = Mixer(tiny_lm)
    mixer.add(random_tangent(tiny_lm, "low", seed=1, scale=0.3), name="low")
    mixer.add(random_tangent(tiny_lm, "full", seed=2, param="full", scale=0.3), name="full")
    rows = [{}, {"low": 0.5}, {"full": 0.5}, {"full": 0.5, "low": -1.0}]
    assert mixer.batches(rows) == [[0, 1], [2, 3]]
    with pytest.raises(DirectionError, match="full-rank"):
        mixer.set_row_weights(rows)
    comp = compare(tiny_lm, "Hello", [Column("base"), Column("low", {"low": 0.5}), Column("full", {"full": 0.5})],
                   SamplingParams(max_new_tokens=4), mixer=mixer)
    assert not comp.batched and comp.batches == 2 and [c.column.label for c in comp.columns] == ["base", "low", "full"]
    one = compare(tiny_lm, "Hello", [Column("base"), Column("low", {"low": 0.5}), Column("low2", {"low": -0.5})],
                  SamplingParams(max_new_tokens=4), mixer=mixer)
    assert one.batched and one.batches == 1
    for cr in one.columns:  # the same text as each column alone
        alone = compare(tiny_lm, "Hello", [cr.column], SamplingParams(max_new_tokens=4), mixer=mixer)
        assert alone.columns[0].result.text == cr.result.text


def test_directions_with_another_A0_get_their_own_branch(tiny_lm):
    mixer = Mixer(tiny_lm)
    mixer.add(random_tangent(tiny_lm, "a", seed=1, scale=0.3), name="a")
    mixer.add(random_tangent(tiny_lm, "c", seed=3, scale=0.3, a0_seed=9), name="c")
    assert len(mixer._adapters.groups) == 2
    mixer.set_weights({"a": 0.6, "c": -0.7})
    via = logits(tiny_lm)
    mixer.set_row_weights([{"a": 0.6, "c": -0.7}], merge=True)
    assert float((via - logits(tiny_lm)).abs().max()) <= 1e-5
    mixer.clear()


def test_an_adapter_weight_that_overflows_is_refused(tiny_lm):
    base = _params(tiny_lm)
    mixer = Mixer(tiny_lm)
    mixer.add(random_tangent(tiny_lm, "a", seed=1), name="a")
    with pytest.raises(DirectionError, match="overflow"):
        mixer.set_weights({"a": 1e38 * 1e3})
    assert not mixer.active and all(torch.equal(p, base[n]) for n, p in tiny_lm.model.named_parameters())


def test_a_low_rank_direction_on_a_weight_that_is_no_linear_layer_is_merged_instead(tiny_lm):
    from engine.weight_delta import WeightDelta

    d = random_tangent(tiny_lm, "a", seed=1, scale=0.3)
    emb = "model.embed_tokens.weight"
    rows, cols = tiny_lm.model.get_parameter(emb).shape
    g = torch.Generator().manual_seed(5)
    tensors = {**d.tensors, emb + ":B": torch.randn(rows, 4, generator=g) * 0.1,
               emb + ":A": torch.randn(4, cols, generator=g) * 0.1}
    odd = WeightDelta("odd", "lowrank", tensors, tiny_lm.identity(), name="odd")
    mixer = Mixer(tiny_lm)
    mixer.add(odd)
    assert mixer.in_place("odd")  # no adapter can carry the embedding: the weights are edited, exactly
    before = logits(tiny_lm)
    mixer.set_weights({"odd": 0.5})
    assert float((logits(tiny_lm) - before).abs().max()) > 1e-3
    mixer.clear()
    assert torch.equal(logits(tiny_lm), before)


def test_merging_a_long_single_mix_is_chosen_by_measured_costs(tiny_lm):
    mixer = Mixer(tiny_lm)
    mixer.add(random_tangent(tiny_lm, "a", seed=1, scale=0.3), name="a")
    mixer.add(random_tangent(tiny_lm, "b", seed=2, scale=0.3), name="b")
    w = {"a": 0.6, "b": -0.4}
    assert not mixer.prefer_merged([w], 10**9)  # nothing timed yet: the adapter, and that run times it
    assert mixer._adapters.cost_per_forward(1) is None
    first = compare(tiny_lm, "Hello", [Column("mix", w)], SamplingParams(max_new_tokens=6), mixer=mixer)
    assert first.merged == 0
    per_pass = mixer._adapters.cost_per_forward(1)
    assert per_pass is not None and per_pass > 0  # the hooks timed themselves over the passes that ran
    base = _params(tiny_lm)
    assert mixer.prefer_merged([w], 10**9)  # long enough: merged (the merge is timed here, once)
    assert mixer._merge_s is not None and mixer._merge_s > 0 and not mixer.active  # and put back as it was
    assert all(torch.equal(p, base[n]) for n, p in tiny_lm.model.named_parameters())
    assert not mixer.prefer_merged([w], 0)
    assert not mixer.prefer_merged([w, {"a": 0.1}], 10**9)  # rows with different low-rank mixes: the adapter
    assert not mixer.prefer_merged([{}], 10**9)  # nothing low-rank to merge
    mixer.set_weights({"a": 0.2})  # what was applied before the comparison comes back afterwards
    # 48 passes of the adapter against one merge and restore: on the tiny model ~11 ms against ~1.4 ms
    assert mixer._adapters.cost_per_forward(1) * 48 > 4 * mixer._merge_s
    merged = compare(tiny_lm, "Hello", [Column("mix", w)], SamplingParams(max_new_tokens=48), mixer=mixer)
    mixer._merge_s = float("inf")  # a merge that would never pay: the same reply through the adapter
    adapter = compare(tiny_lm, "Hello", [Column("mix", w)], SamplingParams(max_new_tokens=48), mixer=mixer)
    assert merged.merged == 1 and adapter.merged == 0
    assert merged.columns[0].result.text == adapter.columns[0].result.text
    assert mixer.rows == [{"a": 0.2}] and not mixer.merged
    mixer.clear()
    assert all(torch.equal(p, base[n]) for n, p in tiny_lm.model.named_parameters())


def test_every_pass_and_every_apply_is_the_merged_model(tiny_lm):
    """What the hooks keep from pass to pass (the rows' summed B's, seen as a batch) must be that of the
    mix applied now: passes after passes, one mix after another, one mix over a batch of several rows, per-row
    mixes, two groups of A0, and with gradients on (out of place)."""
    mixer = Mixer(tiny_lm)
    mixer.add(random_tangent(tiny_lm, "a", seed=1, scale=0.3), name="a")
    mixer.add(random_tangent(tiny_lm, "b", seed=2, scale=0.3), name="b")
    mixer.add(random_tangent(tiny_lm, "c", seed=3, scale=0.3, a0_seed=5), name="c")  # a second group
    p, q = {"a": 0.7, "b": -0.4, "c": 0.5}, {"a": -0.5, "c": -0.9}
    expected = {}
    for name, row in (("p", p), ("q", q), ("0", {})):
        with mixer.applied([row], merge=True):
            expected[name] = logits(tiny_lm)[0]
    plan = [([p], "p", 1), ([q], "q", 1), ([p], "p", 2), ([{}, p, q], "0pq", 3), ([q], "q", 1), ([q, p], "qp", 2)]
    for rows, names, batch in plan:
        with mixer.applied(rows):
            for _ in range(3):
                got = logits(tiny_lm, IDS.repeat(batch, 1))
                for i in range(batch):
                    want = expected[names[i] if len(names) > 1 else names]
                    assert float((got[i] - want).abs().max()) <= 1e-5, (rows, i)
    with mixer.applied([p]):
        with torch.inference_mode():  # generation's passes: what they cache is made of inference tensors ...
            logits(tiny_lm)
        embeds = tiny_lm.model.get_input_embeddings()(IDS).detach().requires_grad_()
        got = tiny_lm.model(inputs_embeds=embeds).logits  # ... and a pass with gradients must not trip on them
        assert float((got[0].detach() - expected["p"]).abs().max()) <= 1e-5  # the out-of-place path
        got.sum().backward()
        assert embeds.grad is not None and torch.isfinite(embeds.grad).all()
    assert not mixer.active
