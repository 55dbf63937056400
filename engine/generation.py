"""Streamed generation with a Stop that ends it within one token step."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from engine.errors import TsdpoError
from engine.models import LoadedModel


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

    def generate_kwargs(self) -> dict:
        kw = dict(max_new_tokens=self.max_new_tokens, repetition_penalty=self.repetition_penalty)
        if self.temperature > 0:
            kw.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw


@dataclass
class GenerationResult:
    text: str
    n_tokens: int
    seconds: float
    stopped: bool = False

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else 0.0


class StopFlag:
    """Set from any thread (the GUI's Stop button); checked by generation between tokens."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()


class _StopOnFlag(StoppingCriteria):
    def __init__(self, flag: StopFlag):
        self.flag = flag

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.flag.is_set(), dtype=torch.bool, device=input_ids.device)


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


class _Streamer(BaseStreamer):
    def __init__(self, deltas: TextDeltas, eos_ids: set[int]):
        self.deltas = deltas
        self.eos_ids = eos_ids
        self.seen_prompt = False
        self.n_tokens = 0

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:  # generate() first hands over the prompt
            self.seen_prompt = True
            return
        ids = [int(t) for t in value.reshape(-1).tolist() if int(t) not in self.eos_ids]
        self.n_tokens += len(ids)
        self.deltas.push(ids)

    def end(self) -> None:
        pass


def eos_ids(lm: LoadedModel) -> set[int]:
    ids = lm.model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if lm.tokenizer.eos_token_id is not None:
        ids.add(lm.tokenizer.eos_token_id)
    return ids


def generate(lm: LoadedModel, prompt: str | list[dict], params: SamplingParams = SamplingParams(),
             on_text: Optional[Callable[[str], None]] = None, stop: Optional[StopFlag] = None) -> GenerationResult:
    """Generate a reply to ``prompt`` in the model's chat format, streaming text pieces to ``on_text``."""
    params.validate()
    enc = lm.tokenizer(lm.chat_text(prompt), return_tensors="pt", add_special_tokens=False).to(lm.device)
    stop = stop or StopFlag()
    eos = eos_ids(lm)
    streamer = _Streamer(TextDeltas(lm.tokenizer, on_text), eos)
    torch.manual_seed(params.seed)
    t0 = time.perf_counter()
    with torch.inference_mode():
        lm.model.generate(**enc, **params.generate_kwargs(), streamer=streamer,
                          stopping_criteria=StoppingCriteriaList([_StopOnFlag(stop)]),
                          pad_token_id=lm.tokenizer.pad_token_id, eos_token_id=sorted(eos) or None)
    seconds = time.perf_counter() - t0
    return GenerationResult(streamer.deltas.finish(), streamer.n_tokens, seconds, stopped=stop.is_set())
