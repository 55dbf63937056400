"""Per-pair margin gradients (engine.signal.pair_gradients, batched, divided by beta) for the verbosity training pairs
and the balanced helpfulness pairs, saved under /tmp/orth for shared_prompts.py (with pair_grads.py's verbosity_val
under /tmp/kern). About 2 s a pair on 2 cores: .venv/bin/python docs/signal/pair_grads_batched.py"""
import os, sys, time, torch
from safetensors.torch import save_file
sys.path.insert(0, os.getcwd())
from engine.models import load_model
from engine.data import load_pairs
from engine.signal import pair_gradients, SignalConfig, split_for_signal
from engine.tangent import linear_weights, shared_A0
lm = load_model(); names = linear_weights(lm); params = dict(lm.model.named_parameters())
cfg = SignalConfig(val_fraction=0.35, seed=0, heldout=64, max_prompt_tokens=96, max_response_tokens=96)
A = {n: shared_A0(n, 8, params[n].shape[1], 0) for n in names}
jobs = [("verbosity", "assets/data/ultrafeedback_helpfulness_400.jsonl", "train"),
        ("helpfulnessbal", "assets/data/ultrafeedback_length_balanced_2.jsonl", "val"),
        ("helpfulnessbal", "assets/data/ultrafeedback_length_balanced_2.jsonl", "train")]
for name, path, part in jobs:
    obj = "helpfulness" if name.startswith("helpfulness") else name
    tr, va = split_for_signal(load_pairs(path, objective=obj), cfg)
    ps = tr.pairs if part == "train" else va.pairs[:64]
    t0 = time.time(); out = []
    for i in range(0, len(ps), 4):
        out.append(pair_gradients(lm, ps[i:i+4], names, A, cfg) / cfg.beta)  # raw margin gradient
        if i % 40 == 0: print(name, part, i, len(ps), f"{time.time()-t0:.0f}s", flush=True)
    save_file({"G": torch.cat(out)}, f"/tmp/orth/{name}_{part}.safetensors")
    print("done", name, part, len(ps), f"{time.time()-t0:.0f}s", flush=True)
