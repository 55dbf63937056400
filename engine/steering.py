"""PaLRS-style steering vectors: training-free residual-stream directions from preference pairs.

For each pair, prompt+chosen and prompt+rejected are teacher-forced through the model in its chat
format; the output of every decoder block is aggregated over the response tokens (mean, or the last
token), and the vector of block l is mean(chosen) - mean(rejected). Every layer is scored on held-out
pairs by how well the projection onto its vector separates chosen from rejected; the best layer
(the first and the last few are skipped) is the one steered unless the user says otherwise. Layers are
ranked by *steerability*: on held-out pairs, how much adding the layer's vector shifts the model's
log-prob margin of chosen over rejected. The separation scores are kept too, but on the embedded model
they were nearly flat across layers and did not predict where steering works.

A weight alpha adds ``alpha * strength * norm_l * v_l / |v_l|`` to the output of block l: ``norm_l``
is the typical norm of that block's output on response tokens, so a coefficient means the same thing
on any model.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Optional

import torch

from engine.data import PairSet
from engine.dpo import completion_sums, encode_pairs, token_logps
from engine.directions import ACTIVATION, Direction, DirectionError, cosine_of, save_direction_file
from engine.errors import Cancelled
from engine.hooks import add_to_block_output, block_output, completion_rows
from engine.models import LoadedModel, runs_at_base
from engine.progress import Phase, ProgressFn, abort_on_cancel

KIND = "steering"
DEFAULT_MAX_RESPONSE_TOKENS = 192
# Weight 1.0 pushes by a tenth of the layer's typical activation norm. On SmolLM2-135M the chosen-minus-
# rejected mean is 4-7% of that norm; at 0.5 the model degenerated into repetition at both ends of the axis,
# at 0.05-0.1 it stayed fluent (see docs/evidence.md).
DEFAULT_STRENGTH = 0.1
AGGREGATES = ("mean", "last")  # over the response tokens: their mean, or the last one
ESTIMATORS = ("mean-difference", "pca")  # per layer: mean(chosen) - mean(rejected), or the paired differences' first PC
CONFIRMED_LAYERS = 3  # the candidates measured exactly after the first-order ranking
PAIRS_PER_BACKWARD = 2  # probe pairs per backward pass of the first-order ranking (its memory grows with them)
ACTIVATION_DTYPES = ("auto", "model", "bfloat16")  # what extraction's activation pass runs in (see activation_decoder)
MIN_PAIRS = 2  # one for the vector, one held out at the least; 100 or more in practice


@dataclass
class SteeringVector(Direction):
    """What a preference adds to the residual stream: a vector per layer, steered at ``layers``."""

    objective: str
    vectors: torch.Tensor  # [n_layers, hidden]: mean(chosen) - mean(rejected) at the output of each block
    norms: torch.Tensor  # [n_layers]: typical norm of the block output on response tokens
    accuracy: torch.Tensor  # [n_layers]: held-out fraction of pairs whose chosen projects above rejected
    effect: torch.Tensor  # [n_layers]: held-out mean projection gap / its std
    layers: list[int]  # blocks steered by default
    model: dict  # identity of the model it was made for
    strength: float = DEFAULT_STRENGTH
    meta: dict = field(default_factory=dict)
    name: str = ""

    space: ClassVar[str] = ACTIVATION
    kind: ClassVar[str] = KIND

    # the protocol
    def steered_layers(self) -> list[int]:
        return list(self.layers)

    def activation_delta(self, layer: int, alpha: float = 1.0) -> torch.Tensor:
        return self.delta(layer, alpha)

    def cosine(self, other: Direction) -> Optional[float]:
        """The mean over the layers either one steers of the cosine of their vectors there."""
        if other.space != self.space:
            return None
        layers = sorted(set(self.layers) | set(other.layers))
        return sum(cosine_of([(self.vectors[l], other.vectors[l])]) for l in layers) / len(layers)

    def describe(self) -> dict:
        return {**super().describe(), "layers": list(self.layers), "strength": self.strength}

    @property
    def ranking(self) -> list[int]:
        """Candidate layers, best first (the stored choice among them is ``layers``)."""
        return list(self.meta.get("ranking", []))

    def unit(self, layer: int) -> torch.Tensor:
        v = self.vectors[layer].float()
        return v / v.norm().clamp_min(1e-12)

    def delta(self, layer: int, alpha: float = 1.0) -> torch.Tensor:
        """What weight ``alpha`` adds to the output of ``layer``."""
        return alpha * self.strength * float(self.norms[layer]) * self.unit(layer)

    def with_settings(self, layers: Optional[list[int]] = None, strength: Optional[float] = None) -> "SteeringVector":
        """Override the steered layers or the strength (the user's choice beats the data's)."""
        n = self.vectors.shape[0]
        if layers is not None:
            bad = [l for l in layers if not 0 <= l < n]
            if bad or not layers:
                raise DirectionError(f"Steered layers must be between 0 and {n - 1}; got {layers}.")
        return SteeringVector(self.objective, self.vectors, self.norms, self.accuracy, self.effect,
                              list(layers) if layers is not None else list(self.layers), self.model,
                              self.strength if strength is None else float(strength), dict(self.meta), self.name)

    def save(self, path: str | Path) -> Path:
        meta = {**self.meta, "objective": self.objective, "layers": self.layers, "strength": self.strength,
                "model": self.model, "name": self.name}
        return save_direction_file(path, KIND, {"vectors": self.vectors.float(), "norms": self.norms.float(),
                                                "accuracy": self.accuracy.float(), "effect": self.effect.float()}, meta)

    @classmethod
    def from_file(cls, kind: str, tensors: dict, meta: dict, path: Path) -> "SteeringVector":
        if kind != KIND:
            raise DirectionError(f"{path} holds a {kind} direction, not a steering vector.")
        try:
            sv = cls(meta["objective"], tensors["vectors"], tensors["norms"], tensors["accuracy"], tensors["effect"],
                     [int(l) for l in meta["layers"]], meta["model"], float(meta.get("strength", DEFAULT_STRENGTH)),
                     meta, meta.get("name") or meta["objective"])
        except KeyError as exc:
            raise DirectionError(f"{path}: the steering vector lacks {exc}; the file is incomplete. Rebuild it.") from exc
        except (TypeError, ValueError) as exc:
            raise DirectionError(f"{path}: its layers or strength are not numbers ({exc}); the file is damaged. Rebuild it.") from exc
        if not math.isfinite(sv.strength):
            raise DirectionError(f"{path}: its strength is {sv.strength}, not a finite number; the file is damaged. Rebuild it.")
        if sv.vectors.ndim != 2 or sv.vectors.shape[0] != sv.norms.shape[0]:
            raise DirectionError(f"{path}: the steering tensors have inconsistent shapes {tuple(sv.vectors.shape)}.")
        if sv.vectors.shape[1] != meta["model"].get("hidden_size"):
            raise DirectionError(f"{path}: vectors of size {sv.vectors.shape[1]} do not match the recorded model.")
        n = sv.vectors.shape[0]
        if not sv.layers or any(not 0 <= l < n for l in sv.layers):
            raise DirectionError(f"{path}: it steers layers {sv.layers}, but its vectors cover layers 0 to {n - 1}. "
                                 "The file is damaged or was edited; rebuild it.")
        return sv


# --------------------------------------------------------------------------------------------- extraction

def _encode(lm: LoadedModel, pair_prompt, chosen: str, rejected: str, max_prompt: int,
            max_response: int) -> tuple[list[int], list[int], list[int]]:
    """Token ids of a pair: the prompt (chat format, generation prompt included), then each reply."""
    return (lm.prompt_ids(pair_prompt, max_prompt), lm.text_ids(chosen, max_response),
            lm.text_ids(rejected, max_response))


class _Collector:
    """Forward hooks that aggregate every block's output over the response tokens (float32 sums, float64 means)
    while ``active``; the prompt's own pass is not collected."""

    def __init__(self, layers: torch.nn.ModuleList, aggregate: str):
        self.aggregate = aggregate
        self.active = False
        self.mask: Optional[torch.Tensor] = None  # [B, T] 1 on response tokens
        self.last: Optional[torch.Tensor] = None  # [B] index of the last token of the sequence
        self.out: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * len(layers)
        self.handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(layers)]

    def _hook(self, i: int):
        def hook(module, args, output):
            if not self.active:
                return
            h = block_output(output).float()
            if self.aggregate == "last":
                vec = h[torch.arange(h.shape[0]), self.last].double()
                norm = vec.norm(dim=-1)
            else:
                m = self.mask
                count = m.sum(1).clamp_min(1).double()
                vec = torch.bmm(m.unsqueeze(1), h).squeeze(1).double() / count.unsqueeze(-1)
                norm = (h.norm(dim=-1) * m).sum(1).double() / count
            self.out[i] = (vec.float(), norm.float())

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _cpu_runs_bfloat16_matmuls() -> bool:
    """Whether this CPU has matrix units for bfloat16 (Intel AMX-BF16), where a bfloat16 matmul is several times a
    float32 one (4.2x at the embedded model's sizes on the 2-core Xeon of docs/benchmarks.md)."""
    try:
        return bool(torch.cpu.get_capabilities().get("amx_bf16"))
    except Exception:  # an older or non-x86 build without the query: assume not
        return False


def _bfloat16_copy_fits(lm: LoadedModel) -> bool:
    """A bfloat16 copy of the decoder takes at most a quarter of the memory available now."""
    need = 2 * sum(p.numel() for p in lm.model.base_model.parameters())
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a system that says: do not risk it
        return False
    return need <= available // 4


def activation_decoder(lm: LoadedModel, choice: str = "auto") -> tuple[Optional[torch.nn.Module], str]:
    """The decoder extraction's activation pass runs, and its dtype: ``None`` for the model's own decoder, or a
    bfloat16 copy of a float32 model's decoder (its parameters cast, its buffers such as rotary frequencies kept),
    the model itself untouched. ``"auto"``: the copy on a CPU with bfloat16 matrix units when it fits in memory
    (2.1x faster passes on the embedded model; every layer's vector within cosine 0.9998 of float32's), else
    the model's own; ``"model"``: always the model's own; ``"bfloat16"``: the copy wherever the model is not
    bfloat16 already. The layer ranking always runs on the model itself: it measures what steering does to it."""
    if choice not in ACTIVATION_DTYPES:
        raise DirectionError(f"The activation dtype is one of {', '.join(ACTIVATION_DTYPES)}, not {choice!r}.")
    own = next(lm.model.parameters()).dtype
    copy_it = own != torch.bfloat16 and (choice == "bfloat16" or (
        choice == "auto" and own == torch.float32 and lm.device.type == "cpu" and _cpu_runs_bfloat16_matmuls()
        and _bfloat16_copy_fits(lm)))
    if not copy_it:
        return None, str(own).removeprefix("torch.")
    base = lm.model.base_model
    memo = {id(p): torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False) for p in base.parameters()}
    return copy.deepcopy(base, memo), "bfloat16"


@torch.no_grad()
def response_activations(lm: LoadedModel, items: list[tuple[list[int], list[int], list[int]]], *,
                         aggregate: str = "mean", batch_size: int = 8, decoder: Optional[torch.nn.Module] = None,
                         progress: Optional[Phase] = None,
                         should_stop: Optional[Callable[[], bool]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Aggregated block outputs over each pair's two replies: ([2N, L, H] vectors, [2N, L] mean token norms),
    chosen then rejected for each pair.

    The prompt is read once per pair: a pass over ``batch_size`` prompts (sorted by length, padded on the left)
    fills the key/value cache, and the replies continue from it, sorted by length and a few rows a pass (each
    row a copy of its prompt's cache), so the replies' padding stays small and no padding sits between a prompt
    and its reply; position ids follow the attention mask, and padding never enters the aggregates. The
    prompt's last token goes with the replies, so "last" is the last token of the whole sequence even for an
    empty reply. ``decoder``: the decoder to run (default the model's own; extraction may pass a bfloat16 copy).
    """
    if aggregate not in AGGREGATES:
        raise DirectionError(f"aggregate must be mean or last, not {aggregate!r}.")
    n, L, H = len(items), lm.n_layers, lm.hidden_size
    if any(not prompt for prompt, _, _ in items):
        raise DirectionError("A pair's prompt has no tokens; every pair needs a prompt.")
    decoder = lm.model.base_model if decoder is None else decoder
    vecs = torch.zeros(2 * n, L, H)
    norms = torch.zeros(2 * n, L)
    order = sorted(range(n), key=lambda i: len(items[i][0]))  # similar prompt lengths share a pass
    pad, dev = lm.pad_id, lm.device
    per_pass = max(2, batch_size // 2)  # reply rows per pass: 8 pairs' 16 replies in 4 passes of 4
    collector = _Collector(lm.decoder_layers(decoder), aggregate)
    try:
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            prefixes = [items[i][0][:-1] for i in idx]
            P = max(len(x) for x in prefixes)
            pre_attn = torch.zeros(len(idx), P, dtype=torch.long)
            cache = None
            if P:
                if should_stop is not None and should_stop():
                    raise Cancelled("steering-vector extraction")
                pre_ids = torch.full((len(idx), P), pad, dtype=torch.long)
                for row, x in enumerate(prefixes):
                    if x:
                        pre_ids[row, P - len(x):] = torch.tensor(x)
                        pre_attn[row, P - len(x):] = 1
                collector.active = False
                cache = decoder(input_ids=pre_ids.to(dev), attention_mask=pre_attn.to(dev),
                                position_ids=(pre_attn.cumsum(-1) - 1).clamp_min(0).to(dev), use_cache=True).past_key_values
            # (row in this batch, 1 chosen / 2 rejected), shortest reply first
            rows = sorted(((j, side) for j in range(len(idx)) for side in (1, 2)), key=lambda r: len(items[idx[r[0]]][r[1]]))
            for at in range(0, len(rows), per_pass):
                if should_stop is not None and should_stop():
                    raise Cancelled("steering-vector extraction")
                chunk = rows[at:at + per_pass]
                tails = [[items[idx[j]][0][-1], *items[idx[j]][side]] for j, side in chunk]
                T = max(len(x) for x in tails)
                ids = torch.full((len(chunk), T), pad, dtype=torch.long)
                attn = torch.zeros(len(chunk), T, dtype=torch.long)
                resp = torch.zeros(len(chunk), T)
                last = torch.zeros(len(chunk), dtype=torch.long)
                for row, x in enumerate(tails):
                    ids[row, :len(x)] = torch.tensor(x)
                    attn[row, :len(x)] = 1
                    resp[row, 1:len(x)] = 1
                    last[row] = len(x) - 1
                sel = torch.tensor([j for j, _ in chunk])
                past = None
                if cache is not None:
                    past = copy.deepcopy(cache)
                    past.batch_select_indices(sel.to(dev))
                full_attn = torch.cat([pre_attn[sel], attn], dim=1)
                pos = (full_attn.cumsum(-1) - 1).clamp_min(0)[:, P:]
                collector.mask, collector.last, collector.active = resp.to(dev), last.to(dev), True
                # the decoder alone: the vocabulary head (a fifth of the embedded model's work) gives nothing here
                decoder(input_ids=ids.to(dev), attention_mask=full_attn.to(dev), position_ids=pos.to(dev),
                        past_key_values=past, use_cache=past is not None)
                out_rows = [2 * idx[j] + side - 1 for j, side in chunk]
                for layer, (v, nm) in enumerate(collector.out):
                    vecs[out_rows, layer] = v.cpu()
                    norms[out_rows, layer] = nm.cpu()
            if progress is not None:
                progress.update(min(start + batch_size, n))
    finally:
        collector.remove()
    return vecs, norms


def candidate_layers(n_layers: int) -> list[int]:
    """Layers eligible for steering: not the first, not the last fifth (at least two), which mostly shape
    the next-token distribution rather than what is said."""
    skip_last = max(2, n_layers // 5)
    eligible = [l for l in range(1, n_layers - skip_last)]
    return eligible or list(range(n_layers))


def score_layers(vectors: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer: fraction of pairs where chosen projects above rejected, and the gap's effect size."""
    unit = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # [L, H]
    gap = torch.einsum("nlh,lh->nl", chosen.double() - rejected.double(), unit.double())  # [N, L]
    accuracy = (gap > 0).double().mean(0)
    effect = gap.mean(0) / gap.std(0).clamp_min(1e-12) if gap.shape[0] > 1 else gap.mean(0).sign()
    return accuracy.float(), effect.float()


def _push(vectors: torch.Tensor, norms: torch.Tensor, layer: int, strength: float) -> torch.Tensor:
    """What weight 1 adds at ``layer``: strength x the layer's typical norm along the unit vector."""
    v = vectors[layer].float()
    return strength * float(norms[layer]) * v / v.norm().clamp_min(1e-12)


def _pair_margins(lm: LoadedModel, batch) -> torch.Tensor:
    """Per pair, the mean per-token log-prob of the chosen reply minus the rejected one's, through the model's own
    head path (Gemma's final soft-capping, Granite's logit scaling apply), computed at completion positions only."""
    mask = batch.target_mask.bool()
    with completion_rows(lm.model, mask):
        logits = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          position_ids=batch.position_ids, use_cache=False).logits[0].float()
    per_seq = completion_sums(token_logps(logits, batch.targets[mask]), mask) / mask.sum(-1).clamp_min(1).float()
    return per_seq[: batch.n_pairs] - per_seq[batch.n_pairs:]


@torch.no_grad()
def steerability(lm: LoadedModel, vectors: torch.Tensor, norms: torch.Tensor, pairs: list, layers: list[int],
                 strength: float, max_prompt_tokens: int = 128, max_response_tokens: int = 96,
                 should_stop: Optional[Callable[[], bool]] = None, progress: Optional[Phase] = None) -> torch.Tensor:
    """How much steering at each layer moves the model's preference, on held-out pairs.

    For layer l, the vector is added at +strength and at -strength (all positions, teacher forcing) and
    the mean per-token log-prob margin log p(chosen) - log p(rejected) is measured; the score is half the
    difference, per unit weight. Separation (how well a layer's projection tells chosen from rejected)
    says where the preference is readable; this says where adding the vector actually moves it.
    """
    batch = encode_pairs(lm, pairs, max_prompt_tokens, max_response_tokens).to(lm.device)
    blocks = lm.decoder_layers()
    scores = torch.full((vectors.shape[0],), float("nan"))
    p = next(lm.model.parameters())

    done = 0
    for layer in layers:
        add = _push(vectors, norms, layer, strength).to(device=p.device, dtype=p.dtype)
        result = []
        for sign in (1.0, -1.0):
            if should_stop is not None and should_stop():  # every pass, not every layer: one pass is a fraction of a second
                raise Cancelled("steering-vector extraction (ranking layers)")
            handle = add_to_block_output(blocks[layer], sign * add)
            try:
                result.append(float(_pair_margins(lm, batch).mean()))
            finally:
                handle.remove()
            done += 1
            if progress is not None:
                progress.update(done)
        scores[layer] = (result[0] - result[1]) / 2
    return scores


class _Offset:
    """A Phase seen from a later part of the same phase: ``update(k)`` reports ``start + k``."""

    def __init__(self, phase: Phase, start: int):
        self.phase, self.start = phase, start

    def update(self, done: int) -> None:
        self.phase.update(self.start + done)


def first_order_steerability(lm: LoadedModel, vectors: torch.Tensor, norms: torch.Tensor, pairs: list,
                             layers: list[int], strength: float, max_prompt_tokens: int = 128,
                             max_response_tokens: int = 96, pairs_per_pass: int = PAIRS_PER_BACKWARD,
                             should_stop: Optional[Callable[[], bool]] = None,
                             progress: Optional[Phase] = None) -> torch.Tensor:
    """``steerability``'s score for every layer at once, to first order: d margin / d alpha at alpha = 0.

    A zero vector z_l is added to each block's output; one forward and one backward pass give d margin / d z_l,
    the sum over positions of the margin's gradient at that block output, and the score is its dot product with
    the layer's push (strength x norm x unit vector), i.e. the derivative of (margin(+a) - margin(-a)) / 2 at a = 0.
    ``pairs_per_pass`` pairs go through each backward pass (the activations it keeps grow with it)."""
    blocks = lm.decoder_layers()
    p = next(lm.model.parameters())
    zeros = {l: torch.zeros(lm.hidden_size, device=p.device, dtype=p.dtype, requires_grad=True) for l in layers}
    if should_stop is not None:  # the backward pass looks at Stop as it reaches each block, as the forward does

        def stop_in_backward(grad):
            if should_stop():
                raise Cancelled("steering-vector extraction (ranking layers)")
            return grad

        for z in zeros.values():
            z.register_hook(stop_in_backward)
    pushes = {l: _push(vectors, norms, l, strength) for l in layers}
    total = {l: 0.0 for l in layers}
    chunks = [pairs[i:i + pairs_per_pass] for i in range(0, len(pairs), pairs_per_pass)]
    handles = [add_to_block_output(blocks[l], zeros[l]) for l in layers]
    try:
        for done, chunk in enumerate(chunks):
            if should_stop is not None and should_stop():
                raise Cancelled("steering-vector extraction (ranking layers)")
            batch = encode_pairs(lm, chunk, max_prompt_tokens, max_response_tokens).to(p.device)
            with torch.enable_grad():
                share = _pair_margins(lm, batch).sum() / len(pairs)  # this chunk's share of the mean margin
                grads = torch.autograd.grad(share, [zeros[l] for l in layers])
            for l, g in zip(layers, grads):
                total[l] += float(g.double().cpu() @ pushes[l].double().cpu())
            if progress is not None:
                progress.update(done + 1)
    finally:
        for h in handles:
            h.remove()
    scores = torch.full((vectors.shape[0],), float("nan"))
    for l in layers:
        scores[l] = total[l]
    return scores


@runs_at_base
def extract(lm: LoadedModel, pairs: PairSet, *, aggregate: str = "mean", batch_size: int = 8,
            val_fraction: float = 0.2, seed: int = 0, max_prompt_tokens: int = 256,
            max_response_tokens: Optional[int] = None, layers: Optional[list[int]] = None,
            strength: Optional[float] = None,
            progress: Optional[ProgressFn] = None, should_stop: Optional[Callable[[], bool]] = None,
            name: Optional[str] = None, steer_pairs: int = 4, estimator: str = "mean-difference",
            band: int = 1, activation_dtype: str = "auto") -> SteeringVector:
    """Build a steering vector for ``pairs.objective`` from the pairs (as few as 100 work).

    ``estimator``: per layer, the difference of the mean activations (default), or the first principal component
    of the paired differences chosen_i - rejected_i (repeng's choice; its sign set so most pairs project
    positively). ``band``: steer that many contiguous layers around the best-ranked one, the strength split
    evenly across them (one layer by default). ``activation_dtype``: what the activation pass runs in (see
    ``activation_decoder``; the vectors are float32 whatever it is).

    Runs at the exact base model whatever mix a caller left applied (applied again afterwards). ``progress``
    gets a ``Progress`` for each phase: tokenizing, forward passes, ranking layers. A cancel takes effect
    within one decoder block."""
    if len(pairs) < MIN_PAIRS:
        raise DirectionError(f"{len(pairs)} pair(s) are too few to extract a steering vector: it needs at least "
                             f"{MIN_PAIRS} (100 or more give a steadier vector).")
    if layers is not None and any(not 0 <= l < lm.n_layers for l in layers):
        raise DirectionError(f"Steered layers must be between 0 and {lm.n_layers - 1}; got {layers}.")
    if estimator not in ESTIMATORS:
        raise DirectionError(f"The estimator is one of {', '.join(ESTIMATORS)}, not {estimator!r}.")
    if not 1 <= band <= lm.n_layers:
        raise DirectionError(f"A band is 1 to {lm.n_layers} layers on this model, not {band}.")
    if band > 1 and layers:
        raise DirectionError("Give either the layers to steer or a band around the best one, not both.")
    decoder = activation_decoder(lm, activation_dtype)  # before any hook is installed: a clean copy, if one
    with abort_on_cancel(lm, should_stop, "steering-vector extraction"):
        return _extract(lm, pairs, aggregate, batch_size, val_fraction, seed, max_prompt_tokens,
                        max_response_tokens, layers, strength, progress, should_stop, name, steer_pairs, estimator,
                        band, decoder)


def pca_directions(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """[L, H]: per layer, the first principal component of the paired differences chosen_i - rejected_i ([N, L, H]),
    signed so that most pairs project positively, scaled to the mean projection (so its size reads like a mean
    difference; steering uses its direction only)."""
    diffs = (chosen - rejected).double()  # [N, L, H]
    out = torch.zeros(diffs.shape[1:], dtype=torch.float64)
    for l in range(diffs.shape[1]):
        d = diffs[:, l]
        centered = d - d.mean(0, keepdim=True)
        v = torch.linalg.svd(centered, full_matrices=False).Vh[0] if d.shape[0] > 1 else d[0] / d[0].norm().clamp_min(1e-12)
        proj = d @ v
        positive = float((proj > 0).double().mean())
        if positive < 0.5 or (positive == 0.5 and proj.mean() < 0):
            v, proj = -v, -proj
        out[l] = v * proj.mean()
    return out.float()


def layer_band(best: int, band: int, n_layers: int) -> list[int]:
    """``band`` contiguous layers around ``best`` (as centred as the model's ends allow), never block 0."""
    lo = max(1, min(best - (band - 1) // 2, n_layers - band))
    return list(range(lo, min(lo + band, n_layers)))


def _extract(lm, pairs, aggregate, batch_size, val_fraction, seed, max_prompt_tokens,
             max_response_tokens, layers, strength, progress, should_stop, name, steer_pairs, estimator,
             band, decoder) -> SteeringVector:
    t0 = time.perf_counter()
    applied = lm.applied()  # [] here: the caller's mix was set aside; recorded as provenance
    strength = DEFAULT_STRENGTH if strength is None else float(strength)
    max_response_tokens = max_response_tokens or DEFAULT_MAX_RESPONSE_TOKENS
    train, val = pairs.split(val_fraction, seed)
    held_out = len(val) >= 2
    all_pairs = train.pairs + (val.pairs if held_out else [])
    tokenizing = Phase(progress, "tokenizing", len(all_pairs))
    items = []
    for i, p in enumerate(all_pairs):
        if should_stop is not None and should_stop():
            raise Cancelled("steering-vector extraction (tokenizing)")
        items.append(_encode(lm, p.prompt, p.chosen, p.rejected, max_prompt_tokens, max_response_tokens))
        tokenizing.update(i + 1)
    forward = Phase(progress, "forward passes", len(items))
    copied, pass_dtype = decoder
    watch = lm.decoder_layers(copied) if copied is not None else None  # a copy's blocks watch Stop too
    with abort_on_cancel(lm, should_stop, "steering-vector extraction", blocks=watch):
        acts, norms = response_activations(lm, items, aggregate=aggregate, batch_size=batch_size, decoder=copied,
                                           progress=forward, should_stop=should_stop)
    del copied, decoder
    chosen, rejected = acts[0::2].double(), acts[1::2].double()
    n_train = len(train)
    if estimator == "pca":
        vectors = pca_directions(chosen[:n_train], rejected[:n_train])
    else:
        vectors = (chosen[:n_train].mean(0) - rejected[:n_train].mean(0)).float()  # float64 means, stored as float32
    typical = norms[: 2 * n_train].double().mean(0).float()
    sc, sr = (chosen[n_train:], rejected[n_train:]) if held_out else (chosen, rejected)
    accuracy, effect = score_layers(vectors, sc, sr)
    cands = candidate_layers(lm.n_layers)
    probe_pairs = (val.pairs if held_out else train.pairs)[:steer_pairs]
    # Every candidate to first order (one forward and backward pass per two probe pairs), then the few best
    # measured at +-strength: the ranking costs a few passes, not two per layer.
    confirm = min(CONFIRMED_LAYERS, len(cands))
    chunks = -(-len(probe_pairs) // PAIRS_PER_BACKWARD)
    ranking_phase = Phase(progress, "ranking layers", chunks + 2 * confirm)
    estimate = first_order_steerability(lm, vectors, typical, probe_pairs, cands, strength, should_stop=should_stop,
                                        progress=ranking_phase)
    by_estimate = sorted(cands, key=lambda l: float(estimate[l]), reverse=True)
    offset = _Offset(ranking_phase, chunks)
    steer = steerability(lm, vectors, typical, probe_pairs, by_estimate[:confirm], strength, should_stop=should_stop,
                         progress=offset)
    measured = by_estimate[:confirm]
    ranking = sorted(measured, key=lambda l: float(steer[l]), reverse=True) + by_estimate[confirm:]
    scores = torch.where(torch.isnan(steer), estimate, steer)
    chosen_layers = list(layers) if layers else layer_band(ranking[0], band, lm.n_layers) if band > 1 else ranking[:1]
    per_layer = strength / len(chosen_layers) if band > 1 else strength  # a band pushes as hard in all as one layer
    meta = {
        "ranking": ranking,
        "steerability": [None if torch.isnan(x) else round(float(x), 5) for x in scores],
        "steerability_first_order": [None if torch.isnan(x) else round(float(x), 5) for x in estimate],
        "steerability_measured": measured,
        "ranked_by": (f"held-out log-prob margin shift per unit weight (steerability): every candidate to first "
                      f"order, the best {confirm} measured at +-strength"),
        "pairs": len(pairs), "train_pairs": n_train, "heldout_pairs": len(val) if held_out else 0,
        "scored_on": "held-out pairs" if held_out else "training pairs (too few for a held-out split)",
        "data_hash": pairs.data_hash(), "data_source": pairs.source, "data_format": pairs.format,
        "method": {"aggregate": aggregate, "val_fraction": val_fraction, "seed": seed, "prompt_read_once": True,
                   "max_prompt_tokens": max_prompt_tokens, "max_response_tokens": max_response_tokens,
                   "strength": strength, "layers": layers, "steer_pairs": steer_pairs, "batch_size": batch_size,
                   "estimator": estimator, "band": band,
                   "activation_dtype": pass_dtype},
        "applied_while_built": applied,
        "seconds": round(time.perf_counter() - t0, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    sv = SteeringVector(pairs.objective, vectors, typical, accuracy, effect, chosen_layers, lm.identity(),
                        per_layer, meta, name or pairs.objective)
    return sv
