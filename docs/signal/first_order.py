"""First-order effects (beta <g_j, B>) of the shipped TS-DPO directions and of other directions built from the training
pairs' gradients (one gradient step, its sign as Adam's first step takes it, kernel ridge), on the held-out pairs
pair_grads.py saved. Run from the repository root: OUT=/tmp/kern .venv/bin/python docs/signal/first_order.py"""
import sys, torch, os
from safetensors.torch import load_file
sys.path.insert(0, os.getcwd())
OUT = os.environ.get("OUT", "/tmp/kern")
from engine.directions import read_direction_file
torch.manual_seed(0)
BETA = 0.1
def L(n):
    p = f"{OUT}/{n}.safetensors"
    return load_file(p)["G"].double() if os.path.exists(p) else None
G = {k: L(k) for k in ("helpfulness_train", "helpfulness_val", "verbosity_val", "harmlessness_val", "verbosity_train", "harmlessness_train")}
vals = {o: G[o + "_val"] for o in ("helpfulness", "verbosity", "harmlessness") if G[o + "_val"] is not None}

import engine.tangent as T
from engine.models import load_model
def bvec(path):
    kind, t, meta = read_direction_file(path)
    return t

def boot(e, n=2000):
    idx = torch.randint(len(e), (n, len(e)))
    m = e[idx].mean(1)
    return float(e.mean()), float(torch.quantile(m, 0.025)), float(torch.quantile(m, 0.975))

def report(label, b):
    out = []
    for o, g in vals.items():
        e = BETA * (g @ b)
        m, lo, hi = boot(e)
        out.append(f"{o} {m:+.4f} [{lo:+.4f},{hi:+.4f}] z={m / (e.std() / len(e) ** 0.5):+.2f}")
    print(f"{label:40s} | " + " | ".join(out))

lm = load_model()
names = T.linear_weights(lm)
params = dict(lm.model.named_parameters())
def shipped(obj):
    t = bvec(f"assets/directions/{obj}.tsdpo.safetensors")
    for n in names[:3]:
        assert torch.equal(t[n + ":A"], T.shared_A0(n, 8, params[n].shape[1], 0)), n
    return torch.cat([t[n + ":B"].reshape(-1) for n in names]).double()

ships = {o: shipped(o) for o in ("helpfulness", "verbosity", "harmlessness")}
for o, b in ships.items():
    report(f"shipped {o} (first order)", b)

def unit_like(v, ref):
    return v * (ref.norm() / v.norm())

for obj in ("helpfulness", "harmlessness", "verbosity"):
    Gt = G.get(obj + "_train")
    if Gt is None:
        continue
    ref = ships[obj]
    d = Gt.mean(0)
    report(f"{obj}: one GD step (mean grad)", unit_like(d, ref))
    report(f"{obj}: sign of mean grad (Adam-like)", unit_like(torch.sign(d), ref))
    K = Gt @ Gt.T
    n = len(Gt)
    for lam in (1e-3, 1e-2, 1e-1, 1.0):
        s = lam * K.diagonal().mean()
        c = torch.linalg.solve(K + s * torch.eye(n, dtype=K.dtype), torch.ones(n, dtype=K.dtype))
        report(f"{obj}: kernel ridge lam={lam:g}", unit_like(Gt.T @ c, ref))
    # held-out kernel alignment: per held-out pair, mean cosine to the training gradients
    gv = vals[obj]
    cos = (gv / gv.norm(dim=1, keepdim=True)) @ (Gt / Gt.norm(dim=1, keepdim=True)).T
    print(f"  {obj}: mean cos(val, train) {float(cos.mean()):+.4f}; train-train offdiag "
          f"{float(((Gt / Gt.norm(dim=1, keepdim=True)) @ (Gt / Gt.norm(dim=1, keepdim=True)).T).fill_diagonal_(0).sum() / (n * (n - 1))):+.4f}")

Gv = G.get("verbosity_train")
if Gv is not None:
    Q, _ = torch.linalg.qr(Gv.T)  # D x 203
    def proj(b):
        return b - Q @ (Q.T @ b)
    for o in ("helpfulness", "harmlessness"):
        report(f"shipped {o}, verbosity span removed", proj(ships[o]))
        if G.get(o + "_train") is not None:
            report(f"{o}: GD step, verbosity span removed", unit_like(proj(G[o + "_train"].mean(0)), ships[o]))
    dv = Gv.mean(0)
    for o in ("helpfulness",):
        b = ships[o]
        report(f"shipped {o}, mean verbosity grad removed", b - dv * (dv @ b) / (dv @ dv))
