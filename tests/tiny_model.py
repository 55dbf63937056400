"""A tiny random Llama with a small byte-level BPE tokenizer and a ChatML template, built in a second."""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Preference mixing combines directions learned from pairs of responses.",
    "A helpful answer explains the steps clearly; a harmful one does not.",
    "Write a short poem about the sea, the wind and the night.",
    "How do I cook rice? Rinse it, add water, and simmer for fifteen minutes.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ; : ! ? ' \" ( ) [ ] { }",
]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None)
    fast.chat_template = CHATML
    return fast


def build_tiny_model(folder: Path, seed: int = 0, n_layers: int = 3, hidden: int = 32) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tok = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def random_tangent(lm, objective: str, seed: int, param: str = "lowrank", rank: int = 4, scale: float = 0.05,
                   a0_seed: int = 0):
    """A weight-space direction with random values on every linear weight: for checking the machinery
    (mixing, export), not the training."""
    import torch

    from engine.tangent import linear_weights, shared_A0
    from engine.weight_delta import WeightDelta

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for n in linear_weights(lm):
        out_f, in_f = lm.model.get_parameter(n).shape
        if param == "full":
            tensors[n] = torch.randn(out_f, in_f, generator=g) * scale / in_f ** 0.5
        else:
            tensors[n + ":B"] = torch.randn(out_f, rank, generator=g) * scale
            tensors[n + ":A"] = shared_A0(n, rank, in_f, a0_seed)
    return WeightDelta(objective, param, tensors, lm.identity())


def applied_full_mix(lm, weight: float = 1.5):
    """A full-rank random mix applied at ``weight`` (what a job must find again when it ends, stopped or not): the
    mixer, the ids to check the model on, and the logits the mix gives them."""
    import torch

    from engine.mixer import Mixer

    mixer = Mixer(lm)
    mixer.add(random_tangent(lm, "w", seed=3, param="full", scale=0.5), name="w")
    mixer.set_weights({"w": weight})
    ids = torch.tensor([[1, 5, 9, 14]])
    with torch.no_grad():
        logits = lm.model(ids).logits.clone()
    return mixer, ids, logits
