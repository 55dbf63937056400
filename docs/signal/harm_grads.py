"""Per-pair margin gradients (engine.signal.pair_gradients, divided by beta) of the length-matched HH-RLHF training
split (163 pairs), saved to /tmp/orth/hhm_train.safetensors (float16) beside the ones docs/signal/keep_grads.py saves
(its harmlessness_val is this file's held-out split). About 2 s a pair on 2 cores: .venv/bin/python
docs/signal/harm_grads.py, then docs/signal/harm_first_order.py."""
import os, sys, time, torch
from safetensors.torch import save_file
sys.path.insert(0, os.getcwd())
from engine.models import load_model
from engine.data import load_pairs
from engine.signal import pair_gradients, SignalConfig, split_for_signal
from engine.tangent import linear_weights, shared_A0
torch.set_num_threads(2); os.makedirs("/tmp/orth", exist_ok=True)
lm = load_model(); names = linear_weights(lm); params = dict(lm.model.named_parameters())
cfg = SignalConfig(val_fraction=0.35, seed=0, heldout=64, max_prompt_tokens=96, max_response_tokens=96)
A = {n: shared_A0(n, 8, params[n].shape[1], 0) for n in names}
tr, _ = split_for_signal(load_pairs("assets/data/hh_rlhf_harmless_length_matched_1.25.jsonl", objective="harmlessness"), cfg)
t0 = time.time(); out = []
for i in range(0, len(tr.pairs), 4):
    out.append(pair_gradients(lm, tr.pairs[i:i+4], names, A, cfg) / cfg.beta)
    if i % 40 == 0: print("hhm train", i, len(tr.pairs), f"{time.time()-t0:.0f}s", flush=True)
save_file({"G": torch.cat(out).half()}, "/tmp/orth/hhm_train.safetensors")
print("done", len(tr.pairs), f"{time.time()-t0:.0f}s", flush=True)
