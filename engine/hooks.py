"""What a forward hook on a decoder block needs: the block's hidden state, and its output with that state
replaced. transformers' decoder blocks return a tensor or a tuple whose first item is the hidden state."""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterator, Optional

import torch


def block_output(out):
    """Decoder blocks return a tensor or a tuple whose first item is the hidden state (transformers 5 does both)."""
    return out[0] if isinstance(out, tuple) else out


def with_block_output(out, hidden):
    """A block's output with its hidden state replaced, in the form the block returned it."""
    return (hidden, *out[1:]) if isinstance(out, tuple) else hidden


def add_to_block_output(block, delta: torch.Tensor):
    """A forward hook that adds ``delta`` to the block's output at every position; returns its handle."""
    return block.register_forward_hook(lambda module, args, out: with_block_output(out, block_output(out) + delta))


@functools.cache
def _conv1d() -> tuple:
    """GPT-2's ``Conv1D`` (a linear map whose weight is stored [in, out]), where transformers has it."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - every supported transformers has it
        return ()
    return (Conv1D,)


def is_linear(module: torch.nn.Module) -> bool:
    """A linear map with one weight matrix: ``nn.Linear`` ([out, in]) or GPT-2's ``Conv1D`` ([in, out])."""
    return isinstance(module, (torch.nn.Linear, *_conv1d()))


def stored_transposed(module: torch.nn.Module) -> bool:
    """Its weight is stored [in, out] (``Conv1D``): a delta for it is the transpose of the linear map's."""
    return isinstance(module, _conv1d())


def in_out(module: torch.nn.Module) -> tuple[int, int]:
    """(in features, out features) of a linear layer, whichever way it stores its weight."""
    rows, cols = module.weight.shape
    return (rows, cols) if stored_transposed(module) else (cols, rows)


def linear_map(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """W x without the bias, in the layer's own orientation."""
    return x @ module.weight if stored_transposed(module) else torch.nn.functional.linear(x, module.weight)


def linear_layer(modules: dict, weight: str) -> Optional[torch.nn.Module]:
    """The linear layer (``is_linear``) whose weight is named ``weight`` (``modules``: ``dict(model.named_modules())``),
    else None."""
    module = modules.get(weight[: -len(".weight")]) if weight.endswith(".weight") else None
    return module if module is not None and is_linear(module) else None


def transposed_weights(modules: dict, weights) -> set[str]:
    """Those of ``weights`` that belong to a linear layer storing its weight [in, out] (``stored_transposed``)."""
    return {w for w in weights if (m := linear_layer(modules, w)) is not None and stored_transposed(m)}


@contextmanager
def completion_rows(model, mask: torch.Tensor) -> Iterator[None]:
    """The language-model head computes logits only where ``mask`` [rows, T] is set: its input [rows, T, H] becomes
    [1, N, H] (N = mask.sum(), row-major), so ``.logits[0]`` is ``logits[mask]`` of the whole forward. Anything the
    model does after its head (soft-capping, logit scaling) still applies. Losses over completion tokens need
    nothing else, and the 49k-wide head is most of a small model's cost."""
    head = model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda module, args: (args[0][mask].unsqueeze(0), *args[1:]), prepend=True)
    try:
        yield
    finally:
        handle.remove()
