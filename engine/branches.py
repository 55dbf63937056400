"""Low-rank training branches beside the linear layers: tau = B A0 per weight, never materialized.

- ``lora_branches``: the ordinary model at theta0 + B A0, each selected linear layer adding (x A0^T) B^T.
- ``tangent_branches``: the model linearized at theta0 along B A0, in forward-mode AD (inside
  ``torch.autograd.forward_ad.dual_level``): the primal of every output is the base model's and the tangent is
  J tau, differentiable in B. This is what a TS-DPO step for a low-rank direction runs: one pass gives the
  reference (primal) and the policy (primal + tangent).

Forward-mode AD is exact but, left alone, slow or wasteful in three places, each written out here with plain
products:

- ``linear`` would compute x 0 for the weight's zero tangent, a third full matrix product per layer (the 49k-wide
  head included); each linear layer here computes its tangent W t itself.
- the gated MLP's rules save primals that are views of dual tensors, which keeps their tangents alive to the end
  of the pass; ``_dual_gated_mlp`` writes its primal and tangent out and saves plain tensors.
- softmax has no fused forward-mode kernel: its decomposition calls ``exp`` on the masked scores (the mask's
  -3.4e38 entries take MKL's slow path, 15 ms a layer on the embedded model). ``dual_attention`` computes the
  primal with the fused softmax and the tangent in closed form, P (dS - sum(P dS)).
"""

from __future__ import annotations

import functools
import sys
from contextlib import contextmanager
from typing import Iterator, Mapping, Optional

import torch
import torch.autograd.forward_ad as fwAD

from engine.directions import DirectionError
from engine.hooks import is_linear, linear_layer, linear_map

Factors = Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # weight name -> (B [out, r], A0 [r, in])
DUAL_ATTENTION = "tsdpo_dual"


def _linear_modules(model: torch.nn.Module, factors: Factors) -> dict[str, torch.nn.Module]:
    modules = dict(model.named_modules())
    out = {}
    for w in factors:
        module = linear_layer(modules, w)
        if module is None:
            raise DirectionError(f"{w} is not the weight of a linear layer: it cannot carry a low-rank branch.")
        out[w[: -len(".weight")]] = module
    return out


def _branch(x: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(x A0^T) B^T: what tau = B A0 adds to a linear layer's output for input x."""
    B, A = factors
    return (x @ A.T) @ B.T


def _linear_tangent(module: torch.nn.Module, x: torch.Tensor, dx: Optional[torch.Tensor],
                    factors: Optional[tuple[torch.Tensor, torch.Tensor]]) -> Optional[torch.Tensor]:
    """The tangent of a linear layer's output at input x with tangent dx: W dx, plus the branch where the layer
    has one (None when neither)."""
    tangent = None if dx is None else linear_map(module, dx)
    if factors is not None:
        branch = _branch(x, factors)
        tangent = branch if tangent is None else tangent + branch
    return tangent


@contextmanager
def _hooks(handles: list, replaced: tuple = ()) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for module in replaced:  # the class's forward again
            del module.forward


def lora_branches(model: torch.nn.Module, factors: Factors):
    """The ordinary model at theta0 + B A0: each selected linear layer adds (x A0^T) B^T to its output."""
    handles = []
    for name, module in _linear_modules(model, factors).items():
        f = factors[name + ".weight"]
        handles.append(module.register_forward_hook(lambda mod, args, out, f=f: out + _branch(args[0], f)))
    return _hooks(handles)


def tangent_branches(model: torch.nn.Module, factors: Factors):
    """The linearized model along tau = B A0 (use inside ``forward_ad.dual_level``): every linear layer computes
    its primal from the primal input and its tangent W t as a plain product, and a selected one adds its branch
    (x A0^T) B^T to the tangent."""
    branches = {name: factors[name + ".weight"] for name in _linear_modules(model, factors)}
    incoming: dict[int, Optional[torch.Tensor]] = {}

    def before(mod, args):
        primal, tangent = fwAD.unpack_dual(args[0])
        incoming[id(mod)] = tangent
        return None if tangent is None else (primal, *args[1:])

    def after(name):
        def hook(mod, args, out):
            tangent = _linear_tangent(mod, args[0], incoming.pop(id(mod), None), branches.get(name))
            return None if tangent is None else fwAD.make_dual(out, tangent)

        return hook

    handles, replaced = [], []
    for name, module in model.named_modules():
        if is_linear(module):
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after(name)))
        elif _is_gated_silu_mlp(module):
            module.forward = _dual_gated_mlp(module, name, branches)
            replaced.append(module)
    return _hooks(handles, replaced)


@functools.cache
def _standard_mlp_code():
    from transformers.models.llama import modeling_llama

    return _shape(modeling_llama.LlamaMLP.forward.__code__)


def _is_gated_silu_mlp(module: torch.nn.Module) -> bool:
    """transformers' standard gated MLP, down(silu(gate(x)) * up(x)) (Llama's code, which most families copy)."""
    forward = getattr(type(module), "forward", None)
    return (hasattr(forward, "__code__") and _shape(forward.__code__) == _standard_mlp_code()
            and all(isinstance(getattr(module, n, None), torch.nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))
            and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"))


def _dual_gated_mlp(module: torch.nn.Module, name: str, branches: Factors):
    """The gated MLP's primal and tangent written out: with g = gate x, u = up x, s = sigmoid(g),

        d silu(g) = s (1 + g (1 - s)) dg,   d(silu(g) u) = d silu(g) u + silu(g) du

    Forward-mode AD would compute the same, but the primals its rules save for the backward are views of the
    dual tensors and keep dg and du alive until the dual level ends (two [tokens, intermediate] tensors a layer)."""
    plain = type(module).forward.__get__(module)
    layers = {n: getattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")}

    def linear(part: str, x: torch.Tensor, dx: Optional[torch.Tensor]):
        layer = layers[part]
        out = torch.nn.functional.linear(x, layer.weight, layer.bias)
        return out, _linear_tangent(layer, x, dx, branches.get(f"{name}.{part}"))

    def forward(x):
        primal, dx = fwAD.unpack_dual(x)
        if dx is None and not any(f"{name}.{p}" in branches for p in layers):
            return plain(x)
        primal = primal.detach()
        g, dg = linear("gate_proj", primal, dx)
        u, du = linear("up_proj", primal, dx)
        s = torch.sigmoid(g)
        a = module.act_fn(g)  # the primal exactly as the model computes it
        h = a * u
        dh = None
        if dg is not None:
            dh = (dg * (s * (1 + g * (1 - s)))) * u
        if du is not None:
            dh = a * du if dh is None else dh + a * du
        out, dout = linear("down_proj", h, dh)
        return out if dout is None else fwAD.make_dual(out, dout)

    return forward


# Attention ------------------------------------------------------------------------------------------------------

@functools.cache
def _standard_eager():
    """transformers' standard eager attention, as this process first saw it."""
    from transformers.models.llama import modeling_llama

    return modeling_llama.eager_attention_forward


def _repeat_kv(x: Optional[torch.Tensor], groups: int) -> Optional[torch.Tensor]:
    if x is None or groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def dual_attention(module, query, key, value, attention_mask, scaling, dropout: float = 0.0, **kwargs):
    """transformers' standard eager attention (the Llama family's ``eager_attention_forward``: scores, additive
    mask, float32 softmax, weighted values) with the forward-mode tangent written out:

        dS = scaling (dQ K^T + Q dK^T),  dP = P (dS - sum_j P dS),  dO = dP V + P dV

    Inputs without a tangent, or dropout in training, go to the standard function itself."""
    standard = _standard_eager()
    (q, dq), (k, dk), (v, dv) = (fwAD.unpack_dual(t) for t in (query, key, value))
    if (dq is None and dk is None and dv is None) or (dropout and module.training):
        return standard(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    # A primal from unpack_dual is a view of the dual tensor: saved for the backward, it would keep the tangent
    # alive until the dual level ends. Detached, it shares the data and nothing else.
    q, k, v = q.detach(), k.detach(), v.detach()
    groups = module.num_key_value_groups
    k, v, dk, dv = (_repeat_kv(x, groups) for x in (k, v, dk, dv))
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    p32 = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32)
    p = p32.to(q.dtype)
    out = torch.matmul(p, v)
    dscores = None
    if dq is not None:
        dscores = torch.matmul(dq, k.transpose(2, 3)) * scaling
    if dk is not None:
        term = torch.matmul(q, dk.transpose(2, 3)) * scaling
        dscores = term if dscores is None else dscores + term
    dout = None
    if dscores is not None:
        d32 = dscores.to(p32.dtype)  # the tangent in the softmax's precision
        dp = (p32 * (d32 - (p32 * d32).sum(-1, keepdim=True))).to(q.dtype)
        dout = torch.matmul(dp, v)
    if dv is not None:
        term = torch.matmul(p, dv)
        dout = term if dout is None else dout + term
    return fwAD.make_dual(out, dout).transpose(1, 2).contiguous(), p


@functools.cache
def register_dual_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(DUAL_ATTENTION, dual_attention)
    AttentionMaskInterface.register(DUAL_ATTENTION, eager_mask)


def _shape(code) -> tuple:
    """A function's code without its docstring: copies of one function in two modules compare equal."""
    return code.co_code, code.co_names, code.co_varnames, tuple(c for c in code.co_consts if not isinstance(c, str))


def uses_standard_attention(model: torch.nn.Module) -> bool:
    """Whether every attention layer of ``model`` would run transformers' standard eager function (the code of
    Llama's, which most decoder families copy); others (soft-capping, sinks, GPT-2's own) keep their eager code."""
    reference = _standard_eager().__code__
    seen = False
    for module in model.modules():
        if hasattr(module, "num_key_value_groups") and hasattr(module, "scaling"):
            eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
            code = getattr(eager, "__code__", None)
            if code is None or _shape(code) != _shape(reference):
                return False
            seen = True
    return seen
