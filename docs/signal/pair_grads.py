"""Per-pair margin gradients wrt the low-rank B factors at theta0 (A0 of seed 0, rank 8, all 210 linear weights), one
pair at a time through an ordinary low-rank branch (the reference `engine.signal.pair_gradients` is tested against),
saved for first_order.py. Run from the repository root (about 3.7 s a pair on 2 cores):

    .venv/bin/python docs/signal/pair_grads.py helpfulness:train helpfulness:val verbosity:val harmlessness:val
"""
import os, sys, time, torch
from safetensors.torch import save_file
sys.path.insert(0, os.getcwd())
OUT = os.environ.get("OUT", "/tmp/kern")
os.makedirs(OUT, exist_ok=True)
from engine.models import load_model
from engine.data import load_pairs
from engine.dpo import encode_pairs
from engine.tangent import completion_logps, linear_weights, shared_A0

torch.manual_seed(0)
lm = load_model()
for p in lm.model.parameters():
    p.requires_grad_(False)
names = linear_weights(lm)
params = dict(lm.model.named_parameters())
A = {n: shared_A0(n, 8, params[n].shape[1], 0) for n in names}
B = {n: torch.zeros(params[n].shape[0], 8, requires_grad=True) for n in names}
D = sum(b.numel() for b in B.values())
print("weights", len(names), "D", D, flush=True)

sets = {
    "helpfulness": ("assets/data/ultrafeedback_length_matched_1.25.jsonl", "helpfulness"),
    "verbosity": ("assets/data/ultrafeedback_helpfulness_400.jsonl", "verbosity"),
    "harmlessness": ("assets/data/hh_rlhf_harmless_length_matched_1.25.jsonl", "harmlessness"),
}
for job in sys.argv[1:]:
    obj, part = job.split(":")
    path, o = sets[obj]
    tr, va = load_pairs(path, objective=o).split(0.35, 0)
    for ps in ([tr.pairs] if part == "train" else [va.pairs[:64]]):
        G = torch.zeros(len(ps), D)
        t0 = time.time()
        for i, p in enumerate(ps):
            batch = encode_pairs(lm, [p], 96, 96)
            pol, _ = completion_logps(lm, batch, {n: (B[n], A[n]) for n in names}, "scalarized")
            m = pol[0] - pol[1]
            gs = torch.autograd.grad(m, [B[n] for n in names])
            G[i] = torch.cat([g.reshape(-1) for g in gs])
            if i % 20 == 0:
                print(obj, part, i, len(ps), f"{time.time()-t0:.0f}s", flush=True)
        save_file({"G": G}, f"{OUT}/{obj}_{part}.safetensors")
        print("done", obj, part, len(ps), f"{time.time()-t0:.0f}s", flush=True)
