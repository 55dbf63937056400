"""What a forward hook on a decoder block needs: the block's hidden state, and its output with that state
replaced. transformers' decoder blocks return a tensor or a tuple whose first item is the hidden state."""

from __future__ import annotations

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


def linear_layer(modules: dict, weight: str) -> Optional[torch.nn.Linear]:
    """The ``nn.Linear`` whose weight is named ``weight`` (``modules``: ``dict(model.named_modules())``), else None."""
    module = modules.get(weight[: -len(".weight")]) if weight.endswith(".weight") else None
    return module if isinstance(module, torch.nn.Linear) else None


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
