"""Tiny random causal LMs of many architectures, built from their transformers configs (no download): hidden 64,
4 layers, the tests' small tokenizer, a fixed seed. For the architecture matrix (tests/test_architectures.py)."""

from __future__ import annotations

from pathlib import Path

from tiny_model import build_tokenizer

HIDDEN, LAYERS = 64, 4

# model_type -> config keywords beyond the common ones (what makes each architecture itself at this size)
ARCHITECTURES: dict[str, dict] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16, "final_logit_softcapping": 0.5, "attn_logit_softcapping": 50.0,
               "sliding_window": 32},
    "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 16, "final_logit_softcapping": 0.5, "sliding_window": 32},
    "phi3": {"pad_token_id": None},
    "gpt2": {},
    "gpt_neox": {},
    "olmo2": {},
    "granite": {"residual_multiplier": 0.22, "logits_scaling": 8.0, "embedding_multiplier": 12.0,
                "attention_multiplier": 0.0625},
    "smollm3": {},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 64, "decoder_sparse_step": 1},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
}


def config_for(model_type: str, vocab_size: int, tok):
    from transformers import AutoConfig

    if model_type == "gpt2":
        common = dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=512)
    else:
        common = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=2 * HIDDEN, max_position_embeddings=512)
        if model_type == "gpt_neox":
            common.pop("num_key_value_heads")
    kw = {**common, "vocab_size": vocab_size, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
          "pad_token_id": tok.pad_token_id, "tie_word_embeddings": False, **ARCHITECTURES[model_type]}
    return AutoConfig.for_model(model_type, **kw)


def build_architecture(model_type: str, folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    tok = build_tokenizer()
    config = config_for(model_type, len(tok), tok)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
