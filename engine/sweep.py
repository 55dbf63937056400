"""Sweeping the preference plane: the numbers behind the paper's claims, on the user's own model and data.

For each method (tangent directions, steering vectors: a grid of plane points; scalarized-DPO runs: one
point each) and each point, per objective:

- held-out implicit-reward accuracy and mean margin against the base model,
  margin = beta * [(log pi(y_w) - log pi0(y_w)) - (log pi(y_l) - log pi0(y_l))] (no generation needed);
- on a prompt set: mean reply length in tokens, distinct-2, and a reward model's mean score when given;
- for tangent directions, the linearization gap: mean |log pi_lin - log pi| per response token, where the
  linearized model is f(theta0) + J (sum alpha tau) and the ordinary one f(theta0 + sum alpha tau);
- the weight-disentanglement error: how far the mix's per-token log-probs on each objective's data are
  from those of that objective's direction alone (the same point projected on its own axis).

Then per method: the Pareto front of (objective x, objective y) and its hypervolume against one reference
point shared by all methods, the smoothness of control along each axis, and canonical correlations
between the representation changes the two directions cause. Every point is saved as it is measured, so
a stopped sweep resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from engine.data import PairSet
from engine.dpo import PairBatch, encode_pairs
from engine.errors import Cancelled, TsdpoError
from engine.mixer import Mixer
from engine.models import LoadedModel, runs_at_base
from engine.paths import atomic_write_text
from engine.progress import abort_on_cancel
from engine.tangent import TangentDirection, completion_logp_derivative, linearization_gap

STATE = "sweep-state.json"
POINTS = "sweep-points.jsonl"  # one measured point per line, appended
RESULT = "sweep.json"
METRICS = ("accuracy", "margin")


class SweepError(TsdpoError):
    pass


@dataclass
class SweepConfig:
    grid: int = 5  # points per axis; odd, so both axes pass through 0
    low: float = -1.0
    high: float = 1.0
    pairs: int = 16  # held-out pairs per objective
    beta: float = 0.1
    prompts: list[str] = field(default_factory=list)
    max_new_tokens: int = 64
    max_prompt_tokens: int = 128
    max_response_tokens: int = 128
    batch_size: int = 4
    pareto_metric: str = "margin"
    reference: Optional[tuple[float, float]] = None  # default: the worst value of each objective over all points
    linearization_gap: bool = True
    reward_model: Optional[str] = None

    def coords(self) -> list[float]:
        if self.grid < 3 or self.grid % 2 == 0:
            raise SweepError(f"--grid must be odd and at least 3 (got {self.grid}), so the axes pass through 0.")
        if not self.low < 0 < self.high:
            raise SweepError(f"The range must contain 0 (got {self.low} to {self.high}).")
        half = self.grid // 2
        neg = [self.low * (half - i) / half for i in range(half)]
        pos = [self.high * (i + 1) / half for i in range(half)]
        return [round(v, 6) for v in neg + [0.0] + pos]


@dataclass
class Method:
    """A grid over two directions (x, y), or single points (scalarized runs, each at weight 1)."""

    name: str
    kind: str  # tangent | steering | scalarized
    x: Optional[object] = None
    y: Optional[object] = None
    points: list[tuple[str, object, float]] = field(default_factory=list)  # scalarized: (label, direction, share)

    def axes(self) -> list:
        """The directions bound to the x and y axes (none for scalarized runs)."""
        return [d for d in (self.x, self.y) if d is not None] if self.kind != "scalarized" else []

    def directions(self) -> list:
        return self.axes() if self.kind != "scalarized" else [d for _, d, _ in self.points]


# --------------------------------------------------------------------------------------------- measuring

@torch.no_grad()
def _token_logps(lm: LoadedModel, batch: PairBatch) -> torch.Tensor:
    """Log-prob of every response token, [rows, seq] (0 outside the response)."""
    out = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                   use_cache=False)
    lp = torch.log_softmax(out.logits.float(), dim=-1).gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)
    return lp * batch.target_mask


def distinct_n(texts: list[str], n: int = 2) -> float:
    grams, total = set(), 0
    for t in texts:
        words = t.split()
        for i in range(len(words) - n + 1):
            grams.add(tuple(words[i:i + n]))
            total += 1
    return len(grams) / total if total else 0.0


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both coordinates (both maximized)."""
    front = []
    for i, (a, b) in enumerate(points):
        if not any((c >= a and d >= b) and (c > a or d > b) for j, (c, d) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def hypervolume(points: list[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by ``points`` and bounded below by ``reference`` (2 objectives, both maximized)."""
    pts = sorted({p for p in points if p[0] > reference[0] and p[1] > reference[1]}, key=lambda p: -p[0])
    area, best_y = 0.0, reference[1]
    for x, y in pts:
        if y > best_y:
            area += (x - reference[0]) * (y - best_y)
            best_y = y
    return area


def monotonicity(values: list[float], coords: list[float]) -> dict:
    """How monotonically ``values`` move with ``coords``: Kendall's tau (1 = always up, -1 = always down) and
    the total-variation ratio |end - start| / sum |steps| (1 = no back-and-forth)."""
    pairs = [(c, v) for c, v in zip(coords, values) if v is not None and math.isfinite(v)]
    n = len(pairs)
    if n < 2:
        return {"kendall_tau": None, "tv_ratio": None}
    concordant = discordant = 0
    for i in range(n):
        for j in range(i + 1, n):
            s = (pairs[j][0] - pairs[i][0]) * (pairs[j][1] - pairs[i][1])
            concordant += s > 0
            discordant += s < 0
    steps = sum(abs(pairs[i + 1][1] - pairs[i][1]) for i in range(n - 1))
    return {"kendall_tau": (concordant - discordant) / (n * (n - 1) / 2),
            "tv_ratio": abs(pairs[-1][1] - pairs[0][1]) / steps if steps > 0 else 1.0}


def canonical_correlations(a: torch.Tensor, b: torch.Tensor, dims: int = 16) -> list[float]:
    """Canonical correlations between two sets of row vectors (same rows), after PCA to ``dims`` each."""
    def reduce(x: torch.Tensor) -> torch.Tensor:
        x = x.double() - x.double().mean(0)
        u, s, _ = torch.linalg.svd(x, full_matrices=False)
        k = min(dims, int((s > s[0] * 1e-9).sum()))
        return u[:, :k]  # an orthonormal basis of the top-k principal directions' scores

    qa, qb = reduce(a), reduce(b)
    return [float(v) for v in torch.linalg.svdvals(qa.T @ qb).clamp(0, 1)]


# --------------------------------------------------------------------------------------------- the sweep

class Sweep:
    def __init__(self, lm: LoadedModel, methods: list[Method], data: dict[str, PairSet], cfg: SweepConfig,
                 out: str | Path, progress: Optional[Callable[[int, int, str], None]] = None,
                 should_stop: Callable[[], bool] = lambda: False, trust_remote_code: bool = False):
        self.lm, self.methods, self.cfg, self.out = lm, methods, cfg, Path(out)
        self.trust_remote_code = trust_remote_code  # for the reward model: the user's explicit choice
        self.progress = progress or (lambda done, total, what: None)
        self.should_stop = should_stop
        self.coords = cfg.coords()
        objectives = []
        for m in methods:
            for d in m.axes():
                if d.objective not in objectives:
                    objectives.append(d.objective)
        self.objectives = objectives or list(data)
        missing = [o for o in self.objectives if o not in data]
        if missing:
            raise SweepError(f"No held-out data for objective(s) {', '.join(missing)}; pass --data OBJECTIVE=FILE for each.")
        if len(self.objectives) != 2:
            raise SweepError(f"A sweep compares two objectives (the plane's two axes); these directions have "
                             f"{len(self.objectives)}: {', '.join(self.objectives) or 'none'}.")
        self.pairs = {o: data[o].pairs[: cfg.pairs] for o in self.objectives}
        for o, p in self.pairs.items():
            if not p:
                raise SweepError(f"The held-out data for {o} has no pairs.")
        self.mixer = Mixer(lm)
        self.names: dict[int, str] = {}
        for m in methods:
            for d in m.directions():
                if id(d) not in self.names:
                    name = f"{m.name}:{d.name}:{len(self.names)}"
                    self.mixer.add(d, name=name)
                    self.names[id(d)] = name
        self.batches = {o: [encode_pairs(lm, p[i:i + cfg.batch_size], cfg.max_prompt_tokens, cfg.max_response_tokens).to(lm.device)
                            for i in range(0, len(p), cfg.batch_size)] for o, p in self.pairs.items()}
        self.key = self._key(data)
        self.state = self._load_state()
        self._reward = None

    # ---------------------------------------------------------------- resume
    def _key(self, data: dict[str, PairSet]) -> str:
        desc = {"model": self.lm.fingerprint, "config": asdict(self.cfg),
                "data": {o: data[o].data_hash() for o in self.objectives},
                "methods": [[m.name, m.kind] + [d.meta.get("_path", d.name) for d in m.directions()] for m in self.methods]}
        return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _load_state(self) -> dict:
        path = self.out / STATE
        if path.is_file():
            try:
                state = json.loads(path.read_text())
            except ValueError as exc:
                raise SweepError(f"{path} is damaged ({exc}); delete it to start the sweep again.") from exc
            if state.get("key") != self.key:
                raise SweepError(f"{self.out} holds a sweep with other settings, model or data. Choose another --out, "
                                 "or delete that folder to start again.")
            state.setdefault("points", {})
            points = self.out / POINTS
            if points.is_file():
                for line in points.read_text().splitlines():
                    try:
                        key, rec = json.loads(line)
                    except ValueError:
                        break  # the last line of a run killed while writing it: that point is measured again
                    state["points"][key] = rec
            return state
        if self.out.exists() and any(self.out.iterdir()):
            raise SweepError(f"{self.out} exists and is not a sweep folder; choose a new --out.")
        return {"key": self.key, "points": {}, "base": None, "cca": {}}

    def _save_state(self) -> None:
        """The small part (key, base, CCA); the points go one line each to their own file (``_save_point``)."""
        self.out.mkdir(parents=True, exist_ok=True)
        small = {k: v for k, v in self.state.items() if k != "points"}
        atomic_write_text(self.out / STATE, json.dumps(small))

    def _save_point(self, key: str, rec: dict) -> None:
        """Append one measured point: the cost of saving does not grow with the number of points saved."""
        self.state["points"][key] = rec
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / POINTS, "a") as f:
            f.write(json.dumps([key, rec]) + "\n")
            f.flush()
            os.fsync(f.fileno())

    # ---------------------------------------------------------------- one point
    def _weights(self, m: Method, x: float, y: float) -> dict[str, float]:
        w = {}
        if m.x is not None:
            w[self.names[id(m.x)]] = x
        if m.y is not None:
            w[self.names[id(m.y)]] = w.get(self.names[id(m.y)], 0.0) + y
        return w

    def _logps(self) -> dict[str, list[list[float]]]:
        """Per objective, the response-token log-probs of each pair's chosen reply, then its rejected one."""
        out = {}
        for o, batches in self.batches.items():
            rows = []
            for b in batches:
                lp = _token_logps(self.lm, b)
                n = b.n_pairs  # a batch holds every chosen reply, then every rejected one
                for i in range(n):
                    rows += [lp[k][b.target_mask[k].bool()].tolist() for k in (i, n + i)]
            out[o] = rows
        return out

    def _generate(self) -> dict:
        from engine.generation import SamplingParams, generate

        if not self.cfg.prompts:
            return {}
        params = SamplingParams(max_new_tokens=self.cfg.max_new_tokens)
        replies = [generate(self.lm, p, params) for p in self.cfg.prompts]
        res = {"length": sum(r.n_tokens for r in replies) / len(replies),
               "distinct2": distinct_n([r.text for r in replies])}
        if self.cfg.reward_model:
            res["reward"] = self._score(list(zip(self.cfg.prompts, (r.text for r in replies))))
        return res

    @torch.no_grad()
    def _score(self, items: list[tuple[str, str]]) -> float:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if self._reward is None:
            try:
                tok = AutoTokenizer.from_pretrained(self.cfg.reward_model, trust_remote_code=self.trust_remote_code)
                model = AutoModelForSequenceClassification.from_pretrained(
                    self.cfg.reward_model, use_safetensors=True, trust_remote_code=self.trust_remote_code)
            except Exception as exc:
                raise SweepError(f"Could not load the reward model {self.cfg.reward_model}: {exc}. Give a folder (or hub id) "
                                 "of a sequence-classification model with safetensors weights.") from exc
            self._reward = (tok, model.eval())
        tok, model = self._reward
        scores = []
        for prompt, reply in items:
            msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
            text = tok.apply_chat_template(msgs, tokenize=False) if getattr(tok, "chat_template", None) else f"{prompt}\n{reply}"
            enc = tok(text, return_tensors="pt", truncation=True, max_length=1024)
            scores.append(float(model(**enc).logits[0, 0]))
        return sum(scores) / len(scores)

    def _lin_gap(self, weighted: list[tuple[TangentDirection, float]]) -> float:
        """Mean |log pi_lin - log pi| per response token on the first batch of each objective (mix cleared)."""
        if not any(alpha for _, alpha in weighted):
            return 0.0
        gaps = [linearization_gap(self.lm, batches[0], weighted, average=True)["gap_mean"]
                for batches in self.batches.values()]
        return sum(gaps) / len(gaps)

    def _metrics(self, lp: dict, base: dict) -> dict:
        res = {}
        for o in self.objectives:
            margins = []
            rows, brows = lp[o], base[o]
            for i in range(0, len(rows), 2):
                pc, pr = sum(rows[i]), sum(rows[i + 1])
                bc, br = sum(brows[i]), sum(brows[i + 1])
                margins.append(self.cfg.beta * ((pc - bc) - (pr - br)))
            res[f"{o}/accuracy"] = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / len(margins)
            res[f"{o}/margin"] = sum(margins) / len(margins)
        return res

    def _measure(self, weights: dict[str, float], tangent: list[tuple[TangentDirection, float]]) -> dict:
        self.mixer.set_weights(weights)
        try:
            lp = self._logps()
            gen = self._generate()
        finally:
            self.mixer.clear()
        rec = {**self._metrics(lp, self.state["base"]["logps"]), **gen, "logps": lp}
        if tangent and self.cfg.linearization_gap:
            rec["lin_gap"] = self._lin_gap(tangent)
        return rec

    # ---------------------------------------------------------------- the run
    def plan(self) -> list[tuple[str, Method, float, float, object]]:
        items = []
        for m in self.methods:
            if m.kind == "scalarized":
                for label, d, share in m.points:
                    items.append((f"{m.name}|{label}", m, share, 0.0, d))
            else:
                for y in self.coords:
                    for x in self.coords:
                        if x == 0 and y == 0:
                            continue  # the base model, measured once
                        items.append((f"{m.name}|{x:g},{y:g}", m, x, y, None))
        return items

    def run(self) -> dict:
        """Measure every point not measured yet, starting from the exact base model whatever a caller left
        applied (it is applied again afterwards), on the kernels the linearization gap's JVP needs."""
        kernels = self.lm.forward_ad_kernels() if self.cfg.linearization_gap and any(m.kind == "tangent" for m in self.methods) \
            else nullcontext()
        with self.lm.at_base(), kernels, abort_on_cancel(self.lm, self.should_stop, "the sweep (run it again to resume)"):
            return self._run()

    def _run(self) -> dict:
        items = self.plan()
        total = len(items) + 1 + sum(1 for m in self.methods if m.kind != "scalarized")
        done = 0
        if self.state["base"] is None:
            self.progress(done, total, "base model")
            self.mixer.clear()
            self.state["base"] = {"logps": self._logps(), **self._generate()}
            self._save_state()
        done += 1
        for key, m, x, y, single in items:
            if key not in self.state["points"]:
                if self.should_stop():
                    raise Cancelled(f"the sweep (saved {done} of {total}; run it again to resume)")
                self.progress(done, total, key)
                t0 = time.perf_counter()
                if m.kind == "scalarized":
                    rec = self._measure({self.names[id(single)]: 1.0}, [])
                else:
                    tangent = [(m.x, x), (m.y, y)] if m.kind == "tangent" else []
                    rec = self._measure(self._weights(m, x, y), tangent)
                rec["seconds"] = round(time.perf_counter() - t0, 2)
                self._save_point(key, rec)
            done += 1
        for m in self.methods:
            if m.kind != "scalarized" and m.name not in self.state["cca"]:
                if self.should_stop():
                    raise Cancelled(f"the sweep (saved {done} of {total}; run it again to resume)")
                self.progress(done, total, f"{m.name}: representation changes")
                self.state["cca"][m.name] = self._cca(m)
                self._save_state()
            done += 1
        self.progress(total, total, "done")
        return self.summarize()

    @torch.no_grad()
    def _hidden(self) -> torch.Tensor:
        """Last-layer hidden states at the response tokens of every held-out pair, stacked [tokens, hidden]."""
        rows = []
        for batches in self.batches.values():
            for b in batches:
                out = self.lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                                    use_cache=False, output_hidden_states=True)
                rows.append(out.hidden_states[-1][b.target_mask.bool()].float().cpu())
        return torch.cat(rows)

    def _cca(self, m: Method) -> dict:
        self.mixer.clear()
        base = self._hidden()
        changes = []
        for d in (m.x, m.y):
            self.mixer.set_weights({self.names[id(d)]: self.cfg.high})
            changes.append(self._hidden() - base)
            self.mixer.clear()
        corr = canonical_correlations(*changes)
        return {"correlations": corr, "mean": sum(corr) / len(corr), "top": corr[0] if corr else None,
                "tokens": int(base.shape[0])}

    # ---------------------------------------------------------------- summary
    def _disentanglement(self, m: Method, x: float, y: float) -> Optional[float]:
        """Mean |log p_mix - log p_alone| per response token on each objective's own data, summed over the two."""
        pts = self.state["points"]
        mix = pts.get(f"{m.name}|{x:g},{y:g}")
        total = 0.0
        for d, c, alone_key in ((m.x, x, f"{m.name}|{x:g},0"), (m.y, y, f"{m.name}|0,{y:g}")):
            alone = pts.get(alone_key) if c != 0 else {"logps": self.state["base"]["logps"]}
            if mix is None or alone is None:
                return None
            a, b = mix["logps"][d.objective], alone["logps"][d.objective]
            diffs = [abs(u - v) for ra, rb in zip(a, b) for u, v in zip(ra, rb)]
            total += sum(diffs) / max(len(diffs), 1)
        return total

    def summarize(self) -> dict:
        cfg, pts, ox, oy = self.cfg, self.state["points"], self.objectives[0], self.objectives[1]
        base = {k: v for k, v in self.state["base"].items() if k != "logps"}
        base.update({f"{o}/accuracy": 0.5 for o in self.objectives})  # every margin is 0: a tie counts half
        base.update({f"{o}/margin": 0.0 for o in self.objectives})
        result = {"model": self.lm.identity(), "config": asdict(cfg), "objectives": self.objectives,
                  "coords": self.coords, "base": base, "methods": {}}
        metric = cfg.pareto_metric
        all_points = []
        for m in self.methods:
            entries = []
            if m.kind == "scalarized":
                for label, d, share in m.points:
                    rec = pts.get(f"{m.name}|{label}")
                    if rec:
                        entries.append({"label": label, "share": share, **{k: v for k, v in rec.items() if k != "logps"}})
            else:
                for y in self.coords:
                    for x in self.coords:
                        rec = base if x == 0 and y == 0 else pts.get(f"{m.name}|{x:g},{y:g}")
                        if rec is None:
                            continue
                        e = {"x": x, "y": y, **{k: v for k, v in rec.items() if k != "logps"}}
                        if m.kind == "tangent" and x == 0 and y == 0:
                            e["lin_gap"] = 0.0
                        e["disentanglement"] = 0.0 if x == 0 and y == 0 else self._disentanglement(m, x, y)
                        entries.append(e)
            result["methods"][m.name] = {"kind": m.kind, "points": entries,
                                         "directions": [d.name for d in m.axes()]}
            all_points += [(e[f"{ox}/{metric}"], e[f"{oy}/{metric}"]) for e in entries]
        ref = tuple(cfg.reference) if cfg.reference else (min(p[0] for p in all_points), min(p[1] for p in all_points))
        result["reference"] = {"point": list(ref), "metric": metric,
                               "how": "given" if cfg.reference else "the worst value of each objective over all methods' points"}
        for name, info in result["methods"].items():
            p = [(e[f"{ox}/{metric}"], e[f"{oy}/{metric}"]) for e in info["points"]]
            front = pareto_front(p)
            info["pareto"] = [info["points"][i].get("label") or [info["points"][i]["x"], info["points"][i]["y"]] for i in front]
            info["hypervolume"] = hypervolume(p, ref)
            info["smoothness"] = self._smoothness(info)
        result["cca"] = self.state["cca"]
        return result

    def _smoothness(self, info: dict) -> dict:
        ox, oy = self.objectives
        out = {}
        if info["kind"] == "scalarized":
            pts = sorted(info["points"], key=lambda e: e["share"])
            shares = [e["share"] for e in pts]
            for o in self.objectives:
                out[o] = monotonicity([e[f"{o}/margin"] for e in pts], shares)
            return out
        grid = {(e["x"], e["y"]): e for e in info["points"]}
        for o, along in ((ox, "x"), (oy, "y")):
            taus, tvs = [], []
            for fixed in self.coords:
                line = [grid.get((c, fixed) if along == "x" else (fixed, c)) for c in self.coords]
                if any(e is None for e in line):
                    continue
                mono = monotonicity([e[f"{o}/margin"] for e in line], self.coords)
                if mono["kendall_tau"] is not None:
                    taus.append(mono["kendall_tau"])
                    tvs.append(mono["tv_ratio"])
            out[o] = {"kendall_tau": sum(taus) / len(taus) if taus else None,
                      "tv_ratio": sum(tvs) / len(tvs) if tvs else None, "lines": len(taus), "along": along}
        return out


# --------------------------------------------------------------------------------------------- outputs

def write_outputs(result: dict, out: str | Path) -> list[Path]:
    """sweep.json, PNG plots (Pareto fronts, heatmaps over the plane) and report.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / RESULT]
    (out / RESULT).write_text(json.dumps(result, indent=2))
    ox, oy = result["objectives"]
    metric = result["reference"]["metric"]
    colours = {"tangent": "tab:blue", "steering": "tab:orange", "scalarized": "tab:green"}

    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    for name, info in result["methods"].items():
        xs = [e[f"{ox}/{metric}"] for e in info["points"]]
        ys = [e[f"{oy}/{metric}"] for e in info["points"]]
        c = colours.get(info["kind"], None)
        ax.scatter(xs, ys, s=18, alpha=0.45, color=c)
        p = [(a, b) for a, b in zip(xs, ys)]
        front = pareto_front(p)
        ax.plot([p[i][0] for i in front], [p[i][1] for i in front], "-o", color=c, ms=5,
                label=f"{name} (hypervolume {info['hypervolume']:.3g})")
    ref = result["reference"]["point"]
    ax.scatter([0], [0], marker="*", s=120, color="black", label="base model", zorder=5)
    ax.scatter([ref[0]], [ref[1]], marker="x", s=60, color="grey", label="hypervolume reference", zorder=5)
    ax.set_xlabel(f"{ox}: held-out {metric}")
    ax.set_ylabel(f"{oy}: held-out {metric}")
    ax.set_title("Pareto fronts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=110)
    plt.close(fig)
    files.append(out / "pareto.png")

    coords = result["coords"]
    for name, info in result["methods"].items():
        if info["kind"] == "scalarized":
            continue
        keys = [k for k in info["points"][0] if k not in ("x", "y", "seconds") and isinstance(info["points"][0][k], (int, float))]
        n = len(keys)
        cols = min(3, n)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
        grid = {(e["x"], e["y"]): e for e in info["points"]}
        for ax, key in zip(axes.flat, keys):
            z = [[(grid.get((x, y)) or {}).get(key, float("nan")) for x in coords] for y in coords]
            z = [[float("nan") if v is None else v for v in row] for row in z]
            step = (coords[-1] - coords[0]) / (len(coords) - 1) / 2
            im = ax.imshow(z, origin="lower", extent=(coords[0] - step, coords[-1] + step, coords[0] - step, coords[-1] + step),
                           cmap="viridis", aspect="auto")
            fig.colorbar(im, ax=ax, fraction=0.046)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel(info["directions"][0] if info["directions"] else "x", fontsize=8)
            ax.set_ylabel(info["directions"][1] if len(info["directions"]) > 1 else "y", fontsize=8)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.suptitle(f"{name}: metrics over the plane")
        fig.tight_layout()
        path = out / f"heatmaps-{_slug(name)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(path)
    (out / "report.md").write_text(report(result))
    files.append(out / "report.md")
    return files


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


def _f(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def report(result: dict) -> str:
    ox, oy = result["objectives"]
    cfg = result["config"]
    ref = result["reference"]
    lines = [f"# Sweep report: {result['model']['model_name']}", "",
             f"Objectives: **{ox}** (x) and **{oy}** (y). Grid {cfg['grid']}x{cfg['grid']} over "
             f"[{cfg['low']}, {cfg['high']}]; {cfg['pairs']} held-out pairs per objective, beta {cfg['beta']}; "
             f"{len(cfg['prompts'])} prompts, up to {cfg['max_new_tokens']} new tokens, greedy.", "",
             f"Hypervolume of each method's Pareto front in ({ox} {ref['metric']}, {oy} {ref['metric']}), against "
             f"the reference point ({ref['point'][0]:.4g}, {ref['point'][1]:.4g}): {ref['how']}.", "",
             "| method | points | hypervolume | Pareto points | smoothness x: Kendall tau / TV ratio | smoothness y | "
             "mean linearization gap | max disentanglement error |",
             "|---|---|---|---|---|---|---|---|"]
    for name, info in result["methods"].items():
        sm = info["smoothness"]
        s = [f"{_f(sm[o].get('kendall_tau'))} / {_f(sm[o].get('tv_ratio'))}" if o in sm else "-" for o in (ox, oy)]
        gaps = [e["lin_gap"] for e in info["points"] if e.get("lin_gap") is not None]
        dis = [e["disentanglement"] for e in info["points"] if e.get("disentanglement") is not None]
        lines.append(f"| {name} ({info['kind']}) | {len(info['points'])} | {_f(info['hypervolume'])} | {len(info['pareto'])} | "
                     f"{s[0]} | {s[1]} | {_f(sum(gaps) / len(gaps)) if gaps else '-'} | {_f(max(dis)) if dis else '-'} |")
    if result.get("cca"):
        lines += ["", "Canonical correlations between the last-layer representation changes caused by the two "
                  "directions alone (each at the top of its axis; lower = more disentangled):", ""]
        for name, c in result["cca"].items():
            lines.append(f"- {name}: mean {_f(c['mean'])}, largest {_f(c['top'])} over {c['tokens']} response tokens")
    lines += ["", "Smoothness: Kendall's tau between an axis coordinate and its own objective's margin along every grid "
              "line (1 = the margin always rises), and |end - start| / sum |steps| (1 = no back-and-forth). "
              "Linearization gap: mean |log p_linearized - log p| per response token. Disentanglement error: mean "
              "|log p_mix - log p_alone| per response token on each objective's data, summed over both objectives.", "",
              "![Pareto fronts](pareto.png)", ""]
    for name, info in result["methods"].items():
        if info["kind"] != "scalarized":
            lines.append(f"![{name}](heatmaps-{_slug(name)}.png)")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- predicted map

def heldout_pairs_of(direction: TangentDirection, limit: Optional[int] = None) -> dict[str, list]:
    """The held-out pairs a tangent direction was validated on, rebuilt from what its file records: the data
    source, objective and pair count, and the split's fraction and seed."""
    from engine.data import load_pairs

    hp = direction.meta.get("hyperparameters", {})
    out = {}
    for src in direction.meta.get("objective_sources", []):
        path = src.get("source")
        if not path or not Path(path).exists():
            raise SweepError(f"{direction.name} was trained on {path or 'data it did not record'}, which is not there now; "
                             "the held-out pairs cannot be rebuilt. Put the file back, or run `tsdpo sweep` with --data.")
        ps = load_pairs(path, objective=src.get("objective"), limit=src.get("pairs"))
        _, val = ps.split(float(hp.get("val_fraction", 0.1)), int(hp.get("seed", 0)))
        out[val.objective] = val.pairs[:limit] if limit else val.pairs
    if not out:
        raise SweepError(f"{direction.name} records no training data, so its held-out pairs are unknown.")
    return out


@runs_at_base
def margin_gradients(lm: LoadedModel, pairs: list, directions: dict[str, TangentDirection], beta: float = 0.1,
                     batch_size: int = 4, max_tokens: int = 128,
                     progress: Optional[Callable[[int, int], None]] = None,
                     should_stop: Callable[[], bool] = lambda: False) -> torch.Tensor:
    """g[i, j] = beta * d/de [log p(y_w) - log p(y_l)] along tau_j at theta0, for pair i: to first order the
    margin of pair i at weights alpha is sum_j alpha_j g[i, j] (the tangent model is linear in the weights up
    to the final softmax). One JVP per direction per batch."""
    names = list(directions)
    g = torch.zeros(len(pairs), len(names), dtype=torch.float64)
    batches = list(range(0, len(pairs), batch_size))
    total, done = len(batches) * len(names), 0
    for j, name in enumerate(names):
        d = directions[name]
        deltas = {n: d.delta(n).to(lm.device, torch.float32) for n in d.param_names()}
        for start in batches:
            if should_stop():
                raise Cancelled("the prediction")
            batch = encode_pairs(lm, pairs[start:start + batch_size], max_tokens, max_tokens).to(lm.device)
            _, jt = completion_logp_derivative(lm, batch, deltas)
            jt = jt.double().cpu()
            n = batch.n_pairs  # every chosen reply, then every rejected one
            g[start:start + n, j] = beta * (jt[:n] - jt[n:])
            done += 1
            if progress:
                progress(done, total)
    return g


def predicted_maps(grads: torch.Tensor, names: list[str], weights_at: Callable[[float, float], dict[str, float]],
                   xs: list[float], ys: list[float]) -> dict[str, list[list[float]]]:
    """Predicted mean margin and implicit-reward accuracy over a grid of plane points (rows = y)."""
    alpha = torch.tensor([[float(weights_at(x, y).get(n, 0.0)) for n in names] for y in ys for x in xs],
                         dtype=torch.float64)  # [points, directions]
    m = grads.to(torch.float64) @ alpha.T  # [pairs, points]
    margin = m.mean(0)
    accuracy = ((m > 0).double() + 0.5 * (m == 0).double()).mean(0)

    def grid(v: torch.Tensor) -> list[list[float]]:
        return [v[i * len(xs):(i + 1) * len(xs)].tolist() for i in range(len(ys))]

    return {"margin": grid(margin), "accuracy": grid(accuracy)}


# --------------------------------------------------------------------------------------------- plane layers

def _to_plane(info: dict, result: dict, axes: dict) -> Optional[Callable[[float, float], tuple[float, float]]]:
    """How a sweep method's weights (wx, wy) map to the studio plane's coordinates, given the objectives and
    scales bound to the plane's axes: {"x": (objective, scale), "y": (objective, scale)}; None if they differ."""
    ox, oy = result["objectives"]
    (ax_o, ax_s), (ay_o, ay_s) = axes.get("x", (None, 1.0)), axes.get("y", (None, 1.0))
    if (ax_o, ay_o) == (ox, oy):
        return lambda wx, wy: (wx / ax_s, wy / ay_s)
    if (ax_o, ay_o) == (oy, ox):
        return lambda wx, wy: (wy / ax_s, wx / ay_s)
    return None


def sweep_layers(result: dict, axes: dict) -> dict[str, dict]:
    """Heatmap layers for the studio plane: every measured metric of every grid method of a sweep."""
    layers = {}
    coords = result["coords"]
    for name, info in result["methods"].items():
        if info["kind"] == "scalarized" or not info["points"]:
            continue
        to_plane = _to_plane(info, result, axes)
        if to_plane is None:
            continue
        grid = {(e["x"], e["y"]): e for e in info["points"]}
        keys = [k for k, v in info["points"][0].items() if k not in ("x", "y", "seconds") and isinstance(v, (int, float))]
        step = (coords[-1] - coords[0]) / (len(coords) - 1) / 2
        (x0, y0), (x1, y1) = to_plane(coords[0] - step, coords[0] - step), to_plane(coords[-1] + step, coords[-1] + step)
        swapped = to_plane(1.0, 0.0)[0] == 0.0
        for key in keys:
            rows = [[(grid.get((x, y)) or {}).get(key) for x in coords] for y in coords]
            values = [[float("nan") if v is None else float(v) for v in row] for row in rows]
            if swapped:
                values = [list(col) for col in zip(*values)]
            layers[f"measured · {name} · {key}"] = {
                "values": values, "extent": (min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1)),
                "points": [(*to_plane(e["x"], e["y"]), "measured") for e in info["points"]],
                "note": f"{key}, measured by `tsdpo sweep` at the marked points ({info['kind']} directions)."}
    return layers


def predicted_layers(prediction: dict, weights_at: Callable[[float, float], dict[str, float]], xr: float, yr: float,
                     n: int = 41, sweep: Optional[dict] = None, axes: Optional[dict] = None) -> dict[str, dict]:
    """First-order predicted margin and accuracy maps over the plane [-xr, xr] x [-yr, yr], from
    ``prediction`` = {"names": [direction...], "grads": {objective: [[g per direction] per pair]}}. Measured
    tangent points of a sweep are marked: confirmed where the measured margin has the predicted sign and lies
    within a factor of 2 of it (or both are below 1e-3), contradicted otherwise."""
    xs = [xr * (2 * i / (n - 1) - 1) for i in range(n)]
    ys = [yr * (2 * i / (n - 1) - 1) for i in range(n)]
    names = prediction["names"]
    step_x, step_y = xr / (n - 1), yr / (n - 1)
    extent = (-xr - step_x, xr + step_x, -yr - step_y, yr + step_y)
    tangent = None
    if sweep is not None and axes is not None:
        tangent = next((i for i in sweep["methods"].values() if i["kind"] == "tangent"), None)
        to_plane = _to_plane(tangent, sweep, axes) if tangent else None
        tangent = tangent if to_plane else None
    layers = {}
    for objective, rows in prediction["grads"].items():
        g = torch.tensor(rows, dtype=torch.float64)
        maps = predicted_maps(g, names, weights_at, xs, ys)
        marks = []
        if tangent is not None:
            for e in tangent["points"]:
                px, py = to_plane(e["x"], e["y"])
                pred = predicted_maps(g, names, weights_at, [px], [py])["margin"][0][0]
                meas = e.get(f"{objective}/margin")
                if meas is None:
                    continue
                small = abs(pred) < 1e-3 and abs(meas) < 1e-3
                ok = small or (pred * meas > 0 and 0.5 <= meas / pred <= 2.0)
                marks.append((px, py, "confirmed" if ok else "contradicted"))
        for metric in ("margin", "accuracy"):
            layers[f"predicted · {objective} · {metric}"] = {
                "values": maps[metric], "extent": extent, "points": marks,
                "note": (f"First-order prediction of the held-out {metric} of {objective} from one JVP per direction per "
                         f"pair ({len(rows)} pairs). " + ("Green: a measured point confirms it (same sign, within 2x); "
                                                          "red: it contradicts it." if marks else
                                                          "Load a sweep (View menu) to mark measured points."))}
    return layers
