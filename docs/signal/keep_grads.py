"""Per-pair margin gradients (engine.signal.pair_gradients, divided by beta) of every split the keep-unchanged analysis
reads, saved under /tmp/orth (float16): the verbosity held-out (110) and training (203) pairs, the balanced helpfulness
held-out (first 64) and training (230) pairs, the length-matched harmlessness held-out pairs (first 64). About 1.7 s a
pair on 2 cores: .venv/bin/python docs/signal/keep_grads.py, then docs/signal/keep_first_order.py."""
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
D = "assets/data/"
jobs = [("verbosity", D+"ultrafeedback_helpfulness_400.jsonl", "val", None),
        ("helpfulness", D+"ultrafeedback_length_balanced_2.jsonl", "val", 64),
        ("verbosity", D+"ultrafeedback_helpfulness_400.jsonl", "train", None),
        ("helpfulness", D+"ultrafeedback_length_balanced_2.jsonl", "train", None),
        ("harmlessness", D+"hh_rlhf_harmless_length_matched_1.25.jsonl", "val", 64)]
for obj, path, part, lim in jobs:
    tr, va = split_for_signal(load_pairs(path, objective=obj), cfg)
    ps = tr.pairs if part == "train" else va.pairs
    ps = ps[:lim] if lim else ps
    t0 = time.time(); out = []
    for i in range(0, len(ps), 4):
        out.append(pair_gradients(lm, ps[i:i+4], names, A, cfg) / cfg.beta)
        if i % 40 == 0: print(obj, part, i, len(ps), f"{time.time()-t0:.0f}s", flush=True)
    save_file({"G": torch.cat(out).half()}, f"/tmp/orth/{obj}_{part}.safetensors")
    print("done", obj, part, len(ps), f"{time.time()-t0:.0f}s", flush=True)
