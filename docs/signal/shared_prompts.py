"""First-order effect of the one-step SGD helpfulness direction (0.25 x the mean helpfulness training gradient: lr 5,
beta 0.1, the DPO gradient at tau = 0 being -beta/2 of it) on verbosity pairs, split by whether their prompt is among
the helpfulness training prompts. Inputs from pair_grads_batched.py and pair_grads.py."""
import sys, os, torch
sys.path.insert(0, os.getcwd())
from safetensors.torch import load_file
from engine.data import load_pairs
from engine.signal import SignalConfig, split_for_signal
cfg = SignalConfig(val_fraction=0.35, seed=0)
L = lambda p: load_file(p)["G"].double()
vt, vv = split_for_signal(load_pairs("assets/data/ultrafeedback_helpfulness_400.jsonl", objective="verbosity"), cfg)
ht, hv = split_for_signal(load_pairs("assets/data/ultrafeedback_length_balanced_2.jsonl", objective="helpfulness"), cfg)
ght = L("/tmp/orth/helpfulnessbal_train.safetensors"); d = 0.25 * ght.mean(0)
hp = {str(p.prompt) for p in ht.pairs}
for lab, ps, G in (("verb train", vt.pairs, L("/tmp/orth/verbosity_train.safetensors")), ("verb val64", vv.pairs[:64], L("/tmp/kern/verbosity_val.safetensors"))):
    e = 0.1 * G @ d
    m = torch.tensor([str(p.prompt) in hp for p in ps])
    print(lab, len(ps), f"all {float(e.mean()):+.4f}", f"prompt in help-train ({int(m.sum())}) {float(e[m].mean()):+.4f}", f"not ({int((~m).sum())}) {float(e[~m].mean()):+.4f}")
print("verbosity pairs total", len(vt), len(vv))
G = L("/tmp/orth/helpfulnessbal_val.safetensors"); e = 0.1 * G @ d
m = torch.tensor([str(p.prompt) in hp for p in hv.pairs[:64]])
print("help val64", f"all {float(e.mean()):+.4f}", f"shared ({int(m.sum())}) {float(e[m].mean()) if m.any() else 0:+.4f}", f"not ({int((~m).sum())}) {float(e[~m].mean()):+.4f}")
import collections
print("pairs per prompt in balanced:", collections.Counter(collections.Counter(str(p.prompt) for p in ht.pairs + hv.pairs).values()))
