"""First-order effects of the one-step SGD helpfulness direction (the balanced pairs' mean margin gradient) before and
after keeping verbosity unchanged (projected onto the complement of the 203 verbosity training pairs' gradients, as
`tsdpo train --keep-unchanged` does), on the held-out pairs of each objective; verbosity pairs whose prompt the
helpfulness direction was trained on are left out, as `tsdpo effects` does. Output: docs/signal/keep_first_order.txt."""
import os, sys, torch, math
sys.path.insert(0, os.getcwd())
from safetensors.torch import load_file
from engine.keep import orthonormal_rows
from engine.data import load_pairs
from engine.signal import SignalConfig, split_for_signal
L = lambda n: load_file(f"/tmp/orth/{n}.safetensors")["G"].float()
Gvt, Ght, Gvv, Ghv = L("verbosity_train"), L("helpfulness_train"), L("verbosity_val"), L("helpfulness_val")
try: Gharm = L("harmlessness_val")
except Exception: Gharm = None
D = "assets/data/"
cfg = SignalConfig(val_fraction=0.35, seed=0)
htr, _ = split_for_signal(load_pairs(D+"ultrafeedback_length_balanced_2.jsonl", objective="helpfulness"), cfg)
_, vva = split_for_signal(load_pairs(D+"ultrafeedback_helpfulness_400.jsonl", objective="verbosity"), cfg)
seen = {p.prompt_key() for p in htr.pairs}
unseen = torch.tensor([p.prompt_key() not in seen for p in vva.pairs])
print("verbosity val", len(vva.pairs), "unseen", int(unseen.sum()), "unseen in first 64", int(unseen[:64].sum()))
gen = torch.Generator().manual_seed(0)
def ci(x):
    idx = torch.randint(len(x), (2000, len(x)), generator=gen); m = x[idx].mean(1)
    return f"{x.mean():+.4f} [{torch.quantile(m,.025):+.4f}, {torch.quantile(m,.975):+.4f}]"
def ratio_ci(own, cross):
    i = torch.randint(len(own), (2000, len(own)), generator=gen); j = torch.randint(len(cross), (2000, len(cross)), generator=gen)
    r = cross[j].mean(1).abs() / own[i].mean(1).abs()
    return f"{abs(cross.mean())/abs(own.mean()):.2f}x [{torch.quantile(r,.025):.2f}, {torch.quantile(r,.975):.2f}]"
step = Ght.mean(0)
Q, dropped = orthonormal_rows(Gvt); print("basis", Q.shape, "dropped", dropped)
def proj(d, Q): return d - (Q @ d) @ Q
cands = {"sgd step": step, "projected (203 verbosity train)": proj(step, Q)}
# also projecting only the mean verbosity gradient
m = Gvt.mean(0); cands["projected (mean only)"] = step - (step @ m) / (m @ m) * m
for name, d in cands.items():
    d = d / step.norm()  # same scale as the step (norm ratio shows the shrink)
    own = Ghv @ d; v64 = (Gvv[:64] @ d)[unseen[:64]]; vall = (Gvv @ d)[unseen]; vtr = Gvt @ d
    print(f"== {name}: norm {d.norm():.3f}")
    print("  own (helpfulness val 64)", ci(own))
    print("  verbosity, first 64 unseen", ci(v64), "ratio", ratio_ci(own, v64))
    print("  verbosity, all unseen", ci(vall), "ratio", ratio_ci(own, vall))
    print("  verbosity train (kept)", ci(vtr))
    if Gharm is not None:
        hh = Gharm @ d; print("  harmlessness val 64", ci(hh), "ratio", ratio_ci(own, hh))
