"""First-order effects of directions built from the length-matched HH-RLHF training gradients in other ways than
the plain mean (what one SGD step follows): the mean of unit gradients, a trimmed mean, and the mean projected off
the verbosity (and helpfulness) training gradients, as `tsdpo train --keep-unchanged` would. Each scored on the 64
held-out harmlessness pairs and on the verbosity and helpfulness held-out pairs; a unit-norm direction each.
Output: docs/signal/harm_first_order.txt (run as `.venv/bin/python docs/signal/harm_first_order.py hhm`)."""
import os, sys, torch
sys.path.insert(0, os.getcwd())
from safetensors.torch import load_file
from engine.keep import orthonormal_rows
L = lambda n: load_file(f"/tmp/orth/{n}.safetensors")["G"].float()
gen = torch.Generator().manual_seed(0)
def ci(x):
    idx = torch.randint(len(x), (2000, len(x)), generator=gen); m = x[idx].mean(1)
    lo, hi = torch.quantile(m, .025), torch.quantile(m, .975)
    return f"{x.mean():+.4f} [{lo:+.4f}, {hi:+.4f}] z {x.mean()/m.std():+.2f} raised {(x>0).float().mean():.2f}"
Gvt, Gvv, Ghv, Ght = L("verbosity_train"), L("verbosity_val"), L("helpfulness_val"), L("helpfulness_train")
Gmv = L("harmlessness_val")
which = sys.argv[1] if len(sys.argv) > 1 else "hhm"
Gtr = L(f"{which}_train")
Gval = Gmv if which == "hhm" else L("hhb_val")
print(which, "train", Gtr.shape[0], "val", Gval.shape[0])
Qv, _ = orthonormal_rows(Gvt)
Qvh, _ = orthonormal_rows(torch.cat([Gvt, Ght]))
proj = lambda d, Q: d - (Q @ d) @ Q
norms = Gtr.norm(dim=1)
print("train grad norms: median", norms.median().item(), "max/median", (norms.max()/norms.median()).item())
mean = Gtr.mean(0)
cands = {
  "mean (SGD step)": mean,
  "mean of unit gradients": (Gtr / norms[:, None]).mean(0),
  "trimmed: drop 10% largest-norm": Gtr[norms <= norms.quantile(0.9)].mean(0),
  "mean, keep verbosity": proj(mean, Qv),
  "mean, keep verbosity+helpfulness": proj(mean, Qvh),
  "unit, keep verbosity": proj((Gtr / norms[:, None]).mean(0), Qv),
}
for name, d in cands.items():
    d = d / d.norm()
    own = Gval @ d
    print(f"== {name}")
    print("   own      ", ci(own))
    print("   verbosity", ci(Gvv @ d))
    print("   helpful  ", ci(Ghv @ d))
    print("   ratio verb", f"{abs((Gvv@d).mean())/abs(own.mean()):.2f}x", "help", f"{abs((Ghv@d).mean())/abs(own.mean()):.2f}x")
