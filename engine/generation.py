"""Generation: one decoding loop for a single reply and for side-by-side columns.

Every column gets the same prompt, chat format, sampling parameters and seed: each batch row samples
from its own generator seeded alike, so with the same mix two columns draw the same random numbers and
differences come only from the mix. Text streams per column as tokens arrive; Stop ends the loop
within one token step.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch

from engine.errors import TsdpoError
from engine.progress import CancelToken
from engine.models import LoadedModel

if TYPE_CHECKING:
    from engine.mixer import Mixer
    from engine.store import Store


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def validate(self) -> "SamplingParams":
        if self.max_new_tokens < 1:
            raise TsdpoError("max new tokens must be at least 1.")
        if self.temperature < 0:
            raise TsdpoError("temperature must be 0 (greedy) or positive.")
        if not 0 < self.top_p <= 1:
            raise TsdpoError("top-p must be in (0, 1].")
        if self.repetition_penalty <= 0:
            raise TsdpoError("repetition penalty must be positive (1.0 = off).")
        return self

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult:
    text: str
    n_tokens: int
    seconds: float
    stopped: bool = False  # Stop was pressed before the reply ended
    truncated: bool = False  # the reply reached max_new_tokens without ending

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else 0.0


class TextDeltas:
    """Turns a growing list of token ids into text pieces, holding back half-decoded characters."""

    def __init__(self, tokenizer, on_text: Optional[Callable[[str], None]]):
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.ids: list[int] = []
        self.text = ""

    def push(self, new_ids: list[int]) -> None:
        self.ids.extend(new_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        delta, self.text = text[len(self.text):], text
        if delta and self.on_text:
            self.on_text(delta)

    def finish(self) -> str:
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self.text




def eos_ids(lm: LoadedModel) -> set[int]:
    ids = lm.model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if lm.tokenizer.eos_token_id is not None:
        ids.add(lm.tokenizer.eos_token_id)
    return ids


def _penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Repetition penalty as in CTRL / transformers: divide positive logits of seen tokens, multiply negative ones."""
    picked = logits.gather(1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(1, seen, picked)


def _top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p > p  # keep the smallest set whose mass reaches p (at least one)
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    out = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return out / out.sum(-1, keepdim=True)


@torch.inference_mode()
def decode(lm: LoadedModel, prompt_ids: list[int], n_rows: int, params: SamplingParams,
           on_text: Optional[Callable[[int, str], None]] = None, stop: Optional[CancelToken] = None,
           mixer: Optional["Mixer"] = None) -> list[GenerationResult]:
    """Generate ``n_rows`` continuations of one prompt in a batch (rows differ only by the mix's per-row weights)."""
    params.validate()
    stop = stop or CancelToken()
    eos = eos_ids(lm)
    pad = lm.pad_id
    dev = lm.device
    gens = [torch.Generator().manual_seed(params.seed) for _ in range(n_rows)]
    deltas = [TextDeltas(lm.tokenizer, (lambda piece, r=r: on_text(r, piece)) if on_text else None) for r in range(n_rows)]
    ids = torch.tensor([prompt_ids] * n_rows, device=dev)
    seen = ids.clone() if params.repetition_penalty != 1.0 else None  # only the penalty needs the history
    attn = torch.ones_like(ids)
    done = [False] * n_rows
    counts = [0] * n_rows
    ended = [0.0] * n_rows
    if mixer is not None:
        mixer.prompt_len = len(prompt_ids)
    t0 = time.perf_counter()
    try:
        out = lm.model(input_ids=ids, attention_mask=attn, use_cache=True)
        for step in range(params.max_new_tokens):
            logits = out.logits[:, -1, :].float()
            if params.repetition_penalty != 1.0:
                logits = _penalize(logits, seen, params.repetition_penalty)
            if params.temperature > 0:
                probs = torch.softmax(logits / params.temperature, dim=-1)
                if params.top_p < 1.0:
                    probs = _top_p(probs, params.top_p)
                probs = probs.cpu()
                nxt = torch.cat([torch.multinomial(probs[r], 1, generator=gens[r]) for r in range(n_rows)]).to(dev)
            else:
                nxt = logits.argmax(-1)
            now = time.perf_counter() - t0
            for r in range(n_rows):
                if done[r]:
                    nxt[r] = pad
                    continue
                tok = int(nxt[r])
                if tok in eos:
                    done[r], ended[r] = True, now
                    continue
                counts[r] += 1
                deltas[r].push([tok])
            if all(done) or stop.is_set() or step == params.max_new_tokens - 1:
                break
            if seen is not None:
                seen = torch.cat([seen, nxt[:, None]], dim=1)
            attn = torch.cat([attn, torch.ones_like(nxt)[:, None]], dim=1)
            out = lm.model(input_ids=nxt[:, None], attention_mask=attn, past_key_values=out.past_key_values, use_cache=True)
    finally:
        if mixer is not None:
            mixer.prompt_len = None
    total = time.perf_counter() - t0
    stopped = stop.is_set()
    return [GenerationResult(deltas[r].finish(), counts[r], ended[r] if done[r] else total, stopped=stopped and not done[r],
                             truncated=not done[r] and counts[r] >= params.max_new_tokens)
            for r in range(n_rows)]


def generate(lm: LoadedModel, prompt: str | list[dict], params: SamplingParams = SamplingParams(),
             on_text: Optional[Callable[[str], None]] = None, stop: Optional[CancelToken] = None,
             mixer: Optional["Mixer"] = None) -> GenerationResult:
    """One reply to ``prompt`` in the model's chat format (with whatever mix is applied), streamed to ``on_text``."""
    cb = (lambda _row, piece: on_text(piece)) if on_text else None
    return decode(lm, lm.prompt_ids(prompt), 1, params, cb, stop, mixer)[0]


@dataclass
class Column:
    label: str
    weights: dict[str, float] = field(default_factory=dict)
    point: Optional[tuple[float, float]] = None


@dataclass
class ColumnResult:
    column: Column
    result: GenerationResult
    generation_id: Optional[int] = None


@dataclass
class Comparison:
    columns: list[ColumnResult]
    batched: bool  # all columns in one batch
    batches: int = 1  # how many batches they ran in (full-rank directions at different weights cannot share one)
    merged: int = 0  # how many of them ran with their low-rank mix merged into the weights (measured to be faster)
    comparison_id: Optional[int] = None
    save_error: Optional[str] = None  # the store could not keep the generations; they are still here


def compare(lm: LoadedModel, prompt: str | list[dict], columns: Sequence[Column], params: SamplingParams = SamplingParams(),
            *, mixer: Optional["Mixer"] = None, on_text: Optional[Callable[[int, str], None]] = None,
            stop: Optional[CancelToken] = None, store: Optional["Store"] = None, session_id: Optional[int] = None,
            batched: Optional[bool] = None, blind: bool = False, extra: Optional[dict] = None) -> Comparison:
    """Run ``prompt`` through 1-4 columns (a label and weights each; base = no weights) and store the result.

    Columns run as one batch with per-row weights (steering and low-rank directions), unless ``batched=False``;
    columns that give full-rank directions different weights run as few batches as the mix allows, and a batch of
    one low-rank mix is merged into the weights when the mixer measured that to be faster (``prefer_merged``).
    Whatever mix was applied before is applied again afterwards. A store that cannot save
    them (a locked database) does not lose them: they come back with ``save_error`` set. ``blind`` is recorded
    with the comparison, so its sources stay hidden wherever it is shown until it is rated; ``extra`` is stored
    with the parameters (a prompt set's name, the row's index).
    """
    from engine.mixer import batches as batches_of

    if not 1 <= len(columns) <= 4:
        raise TsdpoError(f"A comparison has 1 to 4 columns, not {len(columns)}.")
    if any(c.weights for c in columns) and mixer is None:
        raise TsdpoError("Columns with weights need a mixer holding their directions.")
    rows = [dict(c.weights) for c in columns]
    groups = batches_of(mixer, rows) if batched is not False else [[i] for i in range(len(rows))]
    if batched and len(groups) > 1:
        raise TsdpoError("These columns give full-rank directions different weights, which cannot share one batch.")
    ids = lm.prompt_ids(prompt)
    results: list = [None] * len(rows)
    merged = 0
    for group in groups:
        if stop is not None and stop.is_set() and any(r is not None for r in results):
            break
        index = {row: i for row, i in enumerate(group)}
        cb = (lambda r, piece, index=index: on_text(index[r], piece)) if on_text else None
        if mixer is not None:
            batch = [rows[i] for i in group]
            merge = mixer.prefer_merged(batch, params.max_new_tokens)  # one low-rank mix, long enough: merged
            merged += merge
            with mixer.applied(batch, merge=merge):
                out = decode(lm, ids, len(group), params, cb, stop, mixer)
        else:
            out = decode(lm, ids, len(group), params, cb, stop)
        for i, r in zip(group, out):
            results[i] = r
    columns = [c for c, r in zip(columns, results) if r is not None]
    results = [r for r in results if r is not None]
    batched = len(groups) == 1
    comp = Comparison([ColumnResult(c, r) for c, r in zip(columns, results)], batched, len(groups), merged)
    if store is not None and session_id is not None:
        text = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)
        try:
            row = store.add_comparison(session_id, text, {**params.to_json(), **(extra or {}), "blind": bool(blind)}, params.seed, [
                {"label": cr.column.label, "output": cr.result.text, "n_tokens": cr.result.n_tokens,
                 "seconds": cr.result.seconds, "point": cr.column.point, "weights": cr.column.weights,
                 "stopped": cr.result.stopped} for cr in comp.columns])
        except TsdpoError as exc:  # the replies were generated: hand them back with the reason they are not saved
            comp.save_error = str(exc)
            return comp
        comp.comparison_id = row.id
        for cr, g in zip(comp.columns, row.generations):
            cr.generation_id = g.id
    return comp
