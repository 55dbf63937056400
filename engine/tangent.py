"""TS-DPO: DPO on the model linearized at its base weights, one weight delta tau per objective.

    f_lin(x; theta0 + tau) = f(x; theta0) + J_theta f(x; theta0) . tau

computed with ``torch.func.jvp`` over ``functional_call``: one call gives the primal output, which *is*
the reference model's logits, and the tangent, so DPO in tangent space needs no second reference pass.
Because f_lin is linear in tau, directions trained separately add: theta0 + sum_k alpha_k tau_k.

tau lives on a chosen subset of linear weights, in one of two parameterizations:

- ``full``: one delta per weight matrix;
- ``lowrank``: tau = B_k A0 per matrix, A0 a frozen random matrix shared by every objective (seeded,
  and stored in the file), B_k trained. sum_k alpha_k B_k A0 = (sum_k alpha_k B_k) A0 exactly.

The same module also trains the scalarized-DPO baseline (``method="scalarized"``): the policy is the
ordinary model at theta0 + tau and the reference is a separate forward pass at theta0. Either way the
result is a ``WeightDelta`` (``engine.weight_delta``).
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call, jvp

from engine.branches import lora_branches, tangent_branches
from engine.directions import DirectionError, Mix
from engine.dpo import PairBatch, completion_sums, dpo_loss, token_logps
from engine.hooks import completion_rows, in_out, is_linear, linear_layer, transposed_weights
from engine.models import LoadedModel, runs_at_base
from engine.weight_delta import METHODS, PARAMS, WeightDelta


def _selected(lm: LoadedModel, layers: Optional[list[int]], modules: Optional[list[str]]):
    """(module name, module, in a selected block, kept by ``modules``) for every module of the decoder blocks."""
    prefix = lm.decoder_prefix()
    wanted = set(range(lm.n_layers)) if layers is None else set(layers)
    bad = [l for l in wanted if not 0 <= l < lm.n_layers]
    if bad:
        raise DirectionError(f"Layers {sorted(bad)} do not exist: the model has layers 0 to {lm.n_layers - 1}.")
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    for name, mod in lm.model.named_modules():
        m = pattern.match(name + ".")
        if m and int(m.group(1)) in wanted:
            yield name, mod, not modules or any(s in name for s in modules)


def linear_weights(lm: LoadedModel, layers: Optional[list[int]] = None, modules: Optional[list[str]] = None) -> list[str]:
    """Names of the weight matrices of the linear layers (``nn.Linear``, GPT-2's ``Conv1D``) inside the selected
    decoder blocks: what a weight-space direction can cover (``coverage`` says what it leaves out, and why).

    ``layers``: block indices (default all); ``modules``: keep names containing any of these
    substrings (e.g. ``mlp``, ``q_proj``)."""
    names = [name + ".weight" for name, mod, kept in _selected(lm, layers, modules) if kept and is_linear(mod)]
    if not names:
        report = coverage(lm, layers, modules)
        skipped = "; ".join(f"{s['what']} ({s['params']:,} parameters): {s['why']}" for s in report["skipped"]) or "nothing"
        raise DirectionError(f"No linear weights of this {lm.model_type} model match layers={layers} modules={modules}: "
                             f"a direction covers the weight matrices of linear layers only. In the selected blocks: "
                             f"{skipped}.")
    return names


def _skip_reason(module: torch.nn.Module, local: str, p: torch.Tensor) -> tuple[str, str]:
    """(what, why) for a block parameter no direction covers."""
    kind = type(module).__name__
    if local == "bias":
        return "biases", "only the weight matrices of linear layers are directions"
    if p.ndim == 1:
        return "norm weights and other vectors", "only the weight matrices of linear layers are directions"
    if p.ndim >= 3:
        return (f"fused expert tensors ({kind}.{local}, {p.shape[0]} experts)",
                "a mixture-of-experts layer's experts are one 3-D tensor, not linear layers; directions cover the "
                "attention and any dense or shared-expert linear layers only")
    router = "router" in kind.lower()
    return f"{kind} weights", (f"{kind} routes tokens to experts and is not a linear layer" if router
                               else f"{kind} is not a linear layer")


def coverage(lm: LoadedModel, layers: Optional[list[int]] = None, modules: Optional[list[str]] = None) -> dict:
    """What a weight-space direction on this model covers: the weight tensors and their parameters, and what it
    skips (block parameters that are not the weight of a linear layer, or that ``modules`` leaves out), grouped
    by reason."""
    covered, skipped = [], {}
    total = 0
    for name, mod, kept in _selected(lm, layers, modules):
        for local, p in mod.named_parameters(recurse=False):
            total += p.numel()
            full = f"{name}.{local}"
            if kept and local == "weight" and is_linear(mod):
                covered.append((full, p.numel()))
                continue
            what, why = (("other weights", f"not selected by modules={modules}") if not kept
                         else _skip_reason(mod, local, p))
            entry = skipped.setdefault((what, why), {"what": what, "why": why, "tensors": 0, "params": 0, "example": full})
            entry["tensors"] += 1
            entry["params"] += p.numel()
    n_cov = sum(n for _, n in covered)
    return {"model_type": lm.model_type, "weights": [n for n, _ in covered], "tensors": len(covered),
            "params": n_cov, "block_params": total, "fraction": n_cov / total if total else 0.0,
            "skipped": sorted(skipped.values(), key=lambda e: -e["params"])}


def describe_coverage(report: dict) -> list[str]:
    """The coverage report as lines a person reads (the CLI and the training dialog)."""
    per_part: dict[str, int] = {}
    for w in report["weights"]:
        part = re.sub(r"^.*?\.\d+\.", "", w)[: -len(".weight")]  # model.layers.3.self_attn.q_proj.weight -> self_attn.q_proj
        per_part[part] = per_part.get(part, 0) + 1
    parts = ", ".join(f"{p} ({n})" if len(set(per_part.values())) > 1 else p for p, n in per_part.items())
    blocks = f" in each of {next(iter(per_part.values()))} blocks" if len(set(per_part.values())) == 1 else ""
    lines = [f"A direction on this {report['model_type']} model covers {report['tensors']} weight matrices, "
             f"{report['params']:,} of the decoder blocks' {report['block_params']:,} parameters "
             f"({100 * report['fraction']:.0f}%): {parts}{blocks}."]
    for s in report["skipped"]:
        lines.append(f"Skipped: {s['what']}: {s['tensors']} tensors, {s['params']:,} parameters ({s['why']}; e.g. "
                     f"{s['example']}).")
    return lines


def shared_A0(name: str, rank: int, in_features: int, seed: int) -> torch.Tensor:
    """The frozen random projection of one weight matrix: the same for every objective with the same seed."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(rank, in_features, generator=g) / math.sqrt(in_features)


def shared_factors(lm: LoadedModel, names: list[str], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """The A0 [rank, in] of each weight, as ``tsdpo train --param lowrank --seed`` starts from."""
    modules = dict(lm.model.named_modules())
    return {n: shared_A0(n, rank, in_out(linear_layer(modules, n))[0], seed).to(lm.device, lm.dtype) for n in names}


class DirectionModel(nn.Module):
    """The trainable tau (full deltas or B factors) and the loss of one batch under the chosen method.

    The frozen base model is held outside the module's parameters, so a DDP wrapper syncs tau only.
    """

    def __init__(self, lm: LoadedModel, names: list[str], param: str = "lowrank", rank: int = 8,
                 method: str = "tangent", seed: int = 0):
        super().__init__()
        if param not in PARAMS:
            raise DirectionError(f"param must be one of {PARAMS}, not {param!r}.")
        if method not in METHODS:
            raise DirectionError(f"method must be one of {METHODS}, not {method!r}.")
        object.__setattr__(self, "lm", lm)  # not a submodule: its weights stay frozen and unsynced
        self.names, self.param, self.rank, self.method, self.seed = list(names), param, rank, method, seed
        base = dict(lm.model.named_parameters())
        modules = dict(lm.model.named_modules())
        self.keys = {n: n.replace(".", "__") for n in names}
        # weights stored [in, out] (GPT-2's Conv1D): low-rank factors are the linear map's, the delta their transpose
        self.transposed = sorted(transposed_weights(modules, names))
        self.tau = nn.ParameterDict()
        for n in names:
            w = base[n]
            if param == "full":
                self.tau[self.keys[n]] = nn.Parameter(torch.zeros(w.shape, dtype=torch.float32, device=w.device))
            else:
                module = linear_layer(modules, n)
                if module is None:
                    raise DirectionError(f"{n} is not the weight of a linear layer: a low-rank direction cannot cover it.")
                fan_in, fan_out = in_out(module)
                self.tau[self.keys[n]] = nn.Parameter(torch.zeros(fan_out, rank, dtype=torch.float32, device=w.device))
                self.register_buffer(f"A0__{self.keys[n]}", shared_A0(n, rank, fan_in, seed).to(w.device))

    def A0(self, name: str) -> torch.Tensor:
        return getattr(self, f"A0__{self.keys[name]}")

    def factor_dict(self) -> dict[str, torch.Tensor]:
        """Weight name -> its trained tensor (the full delta, or B), in ``names`` order."""
        return {n: self.tau[self.keys[n]] for n in self.names}

    def deltas(self) -> dict[str, torch.Tensor]:
        return _materialized(self.factors(), set(self.transposed))

    def factors(self) -> Tau:
        """Weight name -> the full delta, or -> (B, A0): what ``completion_logps`` takes."""
        return {n: (self.tau[self.keys[n]] if self.param == "full" else (self.tau[self.keys[n]], self.A0(n)))
                for n in self.names}

    def forward(self, batch: PairBatch, beta: float = 0.1, loss_type: str = "sigmoid"):
        # Summed log-probs, as TRL computes its metrics; IPO averages per token inside its loss only.
        pol, ref = completion_logps(self.lm, batch, self.factors(), self.method)
        return _pair_loss(batch, pol, ref, beta, loss_type)

    @torch.no_grad()
    def scaled_losses(self, batch: PairBatch, scales: list[float], beta: float = 0.1, loss_type: str = "sigmoid"):
        """(loss, metrics) of ``batch`` with tau scaled by each of ``scales``. In the linearized model the policy's
        logits are f(theta0) + s J tau, linear in s, so one forward-mode pass serves every scale; the ordinary
        model (scalarized) runs a pass per scale."""
        if self.method != "tangent":
            return [self._at_scale(s, batch, beta, loss_type) for s in scales]
        pol_logits, ref_logits = completion_logits(self.lm, batch, self.factors(), self.method)
        mask = batch.target_mask.bool()
        ref = _sequence_logps(batch, mask, ref_logits)
        d = pol_logits - ref_logits if any(s != 1 for s in scales) else None
        return [_pair_loss(batch, _sequence_logps(batch, mask, pol_logits if s == 1 else ref_logits + s * d), ref,
                           beta, loss_type) for s in scales]

    def _at_scale(self, s: float, batch: PairBatch, beta: float, loss_type: str):
        """The ordinary model's loss with tau scaled by ``s``, tau put back after (no copy at s = 1)."""
        if s == 1:
            return self(batch, beta, loss_type)
        saved = [p.detach().clone() for p in self.tau.values()]
        try:
            for p in self.tau.values():
                p.mul_(s)
            return self(batch, beta, loss_type)
        finally:
            for p, p0 in zip(self.tau.values(), saved):
                p.copy_(p0)

    def to_direction(self, objective: str, meta: dict) -> WeightDelta:
        with torch.no_grad():
            if self.param == "full":
                tensors = {n: self.tau[self.keys[n]].detach().float().cpu().clone() for n in self.names}
            else:
                tensors = {}
                for n in self.names:
                    tensors[n + ":B"] = self.tau[self.keys[n]].detach().float().cpu().clone()
                    tensors[n + ":A"] = self.A0(n).detach().float().cpu().clone()
        meta = {**meta, "rank": self.rank if self.param == "lowrank" else None, "A0_seed": self.seed,
                "weights": len(self.names)}
        if self.param == "lowrank" and self.transposed:
            meta["transposed"] = list(self.transposed)
        return WeightDelta(objective, self.param, tensors, self.lm.identity(), self.method, meta)


Tau = dict  # weight name -> a full delta, or -> (B, A0) low-rank factors


def _pair_loss(batch: PairBatch, pol: torch.Tensor, ref: torch.Tensor, beta: float, loss_type: str):
    """DPO loss and metrics from per-sequence log-probs of the batch's rows (chosen rows first)."""
    b = batch.n_pairs
    counts = batch.target_mask.sum(-1).clamp_min(1).float()
    return dpo_loss(pol[:b], pol[b:], ref[:b], ref[b:], beta, loss_type, lengths=(counts[:b], counts[b:]))


def _materialized(tau: Tau, transposed: set = frozenset()) -> dict[str, torch.Tensor]:
    """Full deltas in the parameters' own layout: B A0, transposed for weights stored [in, out]."""
    out = {}
    for n, t in tau.items():
        if isinstance(t, tuple):
            t = t[0] @ t[1]
            t = t.T if n in transposed else t
        out[n] = t
    return out


def _at_completion(lm: LoadedModel, batch: PairBatch, deltas: dict[str, torch.Tensor]):
    """What the completion functions share: theta0 for the touched weights, a forward that returns the logits
    at response positions for given weights (the head runs at those positions only), and a per-sequence sum
    of per-token values."""
    mask = batch.target_mask.bool()
    params0 = {n: p.detach() for n, p in lm.model.named_parameters() if n in deltas}

    def logits(params):
        with completion_rows(lm.model, mask):
            return functional_call(lm.model, params, args=(), kwargs=_forward_kwargs(batch)).logits[0]

    def seq_sum(logits_at_completion):
        return _sequence_logps(batch, mask, logits_at_completion)

    # Tangents in the primals' key order: jvp compares the two dicts' tree structures, order included.
    dtype = next(iter(params0.values())).dtype
    tangents = {n: deltas[n].to(dtype) for n in params0}
    return params0, tangents, logits, seq_sum, mask


def _sequence_logps(batch: PairBatch, mask: torch.Tensor, logits_at_completion: torch.Tensor) -> torch.Tensor:
    return completion_sums(token_logps(logits_at_completion, batch.targets[mask]), mask)


def _forward_kwargs(batch: PairBatch) -> dict:
    return dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                use_cache=False)


def _lowrank_logits(lm: LoadedModel, batch: PairBatch, factors: Tau, method: str):
    """(policy, reference) logits at completion positions with tau = B A0 run as a branch beside each linear
    layer, never materialized: tangent, one forward-mode pass whose primal is the reference and whose tangent
    is J tau (``branches.tangent_branches``); scalarized, a reference pass and a pass with the branches added."""
    mask = batch.target_mask.bool()
    dtype = lm.dtype
    factors = {n: (B.to(dtype), A.to(dtype)) for n, (B, A) in factors.items()}
    with completion_rows(lm.model, mask):
        if method == "tangent":
            with fwAD.dual_level(), lm.forward_ad_kernels(dual_attention=True), tangent_branches(lm.model, factors):
                ref, dlogits = fwAD.unpack_dual(lm.model(**_forward_kwargs(batch)).logits[0])
            ref = ref.detach()
            return (ref if dlogits is None else ref + dlogits), ref
        with torch.no_grad():
            ref = lm.model(**_forward_kwargs(batch)).logits[0]
        with lora_branches(lm.model, factors):
            return lm.model(**_forward_kwargs(batch)).logits[0], ref


def completion_logits(lm: LoadedModel, batch: PairBatch, tau: Tau, method: str = "tangent") -> tuple[torch.Tensor, torch.Tensor]:
    """(policy, reference) logits at the completion positions of ``batch`` ([N, vocab], row-major over the mask).

    ``tau``: weight name -> full delta, or -> (B, A0) factors on linear layers (every entry), which run as a
    branch beside the layer (``_lowrank_logits``) instead of materializing B A0.
    tangent: policy = f(theta0) + J.tau from one forward-mode pass, whose primal is the reference.
    scalarized: policy = f(theta0 + tau), the ordinary model, with gradients; reference = f(theta0) without.
    """
    if tau and all(isinstance(t, tuple) for t in tau.values()):
        return _lowrank_logits(lm, batch, tau, method)
    factored = [n for n, t in tau.items() if isinstance(t, tuple)]  # (none in a full-rank training step)
    transposed = transposed_weights(dict(lm.model.named_modules()), factored) if factored else set()
    params0, tangents, logits_at_completion, _, _ = _at_completion(lm, batch, _materialized(tau, transposed))
    if method == "tangent":
        with lm.forward_ad_kernels():
            ref_logits, dlogits = jvp(logits_at_completion, (params0,), (tangents,))
        return ref_logits + dlogits, ref_logits.detach()
    with torch.no_grad():
        ref_logits = logits_at_completion(params0)
    return logits_at_completion({n: params0[n] + tangents[n] for n in params0}), ref_logits


def per_token_logps(batch: PairBatch, logits_at_completion: torch.Tensor) -> torch.Tensor:
    """Each row's mean log-prob per response token, from logits at the completion positions."""
    mask = batch.target_mask.bool()
    return _sequence_logps(batch, mask, logits_at_completion) / mask.sum(-1).clamp_min(1).float()


def completion_logps(lm: LoadedModel, batch: PairBatch, tau: Tau, method: str = "tangent",
                     average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence completion log-probs (policy, reference) for all rows of ``batch``, from
    ``completion_logits`` (per response token with ``average``)."""
    mask = batch.target_mask.bool()
    pol_logits, ref_logits = completion_logits(lm, batch, tau, method)
    counts = mask.sum(-1).clamp_min(1).float()

    def per_sequence(logits):
        seq = _sequence_logps(batch, mask, logits)
        return seq / counts if average else seq

    return per_sequence(pol_logits), per_sequence(ref_logits)


@runs_at_base
def completion_logp_derivative(lm: LoadedModel, batch: PairBatch, deltas: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence completion log-probs at theta0 and their directional derivative along tau (one JVP):
    d/de log p(y | x; theta0 + e tau) at e = 0, through the softmax."""
    params0, tangents, logits_at_completion, seq_sum, _ = _at_completion(lm, batch, deltas)
    with torch.no_grad(), lm.forward_ad_kernels():
        return jvp(lambda params: seq_sum(logits_at_completion(params)), (params0,), (tangents,))


def mix_tau(lm: LoadedModel, mix: Mix) -> Tau:
    """The weight-space terms of ``mix`` as (sum alpha B, A0) factors where they share A0 on linear layers (run as
    branches), else as full deltas."""
    ws = mix.weight_space
    modules = dict(lm.model.named_modules())
    try:
        factors = ws.adapter()
    except DirectionError:  # a full-rank term, or another A0
        factors = None
    if factors and all(linear_layer(modules, w) is not None for w in factors):
        return {w: (B.to(lm.device), A.to(lm.device)) for w, (B, A) in factors.items()}
    return {n: d.to(lm.device) for n, d in ws.weight_deltas()}


@runs_at_base
@torch.no_grad()
def linearization_gap(lm: LoadedModel, batch: PairBatch, mix: Mix, average: bool = False) -> dict:
    """Completion log-probs of the linearized model and of the ordinary model at theta0 + sum alpha tau (the
    weight-space terms of ``mix``; per response token with ``average``). The difference shows where the
    tangent approximation holds."""
    tau = mix_tau(lm, mix)
    lin, base = completion_logps(lm, batch, tau, "tangent", average=average)
    ordinary, _ = completion_logps(lm, batch, tau, "scalarized", average=average)
    gap = (lin - ordinary).abs()
    return {"linearized": lin, "ordinary": ordinary, "base": base, "gap_mean": float(gap.mean()),
            "gap_max": float(gap.max())}
