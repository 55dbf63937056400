"""The resumable sweep: every point of every method measured against the base model, each saved as it is
measured (one line appended per point), so a stopped sweep resumes where it stopped."""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from engine.data import PairSet
from engine.dpo import PairBatch, encode_pairs, token_logps
from engine.errors import Cancelled, TsdpoError
from engine.mixer import Mixer
from engine.models import LoadedModel
from engine.paths import atomic_write_text
from engine.progress import Phase, ProgressFn, abort_on_cancel
from engine.sweep.metrics import canonical_correlations, distinct_n, hypervolume, monotonicity, pareto_front
from engine.tangent import linearization_gap

STATE = "sweep-state.json"
POINTS = "sweep-points.jsonl"  # one measured point per line, appended (process k > 0 of a sharded sweep: sweep-points.k.jsonl)
RESULT = "sweep.json"
METRICS = ("accuracy", "margin")


class SweepError(TsdpoError):
    pass


def _won(margin: float) -> float:
    """A pair's implicit-reward accuracy: 1 when the mix prefers the chosen reply more than the base does, a tie half."""
    return 1.0 if margin > 0 else 0.5 if margin == 0 else 0.0


BOOTSTRAP_RESAMPLES = 1000


class _Processes:
    """This process's place in a sweep sharded by ``torchrun`` / ``accelerate launch`` (RANK, WORLD_SIZE in the
    environment; one process otherwise): point i of the plan is measured by process i mod WORLD_SIZE."""

    def __init__(self):
        self.rank, self.world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wait_for_everyone(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def points_file(self, out: Path) -> Path:
        return out / (POINTS if self.rank == 0 else f"sweep-points.{self.rank}.jsonl")


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


@torch.no_grad()
def _token_logps(lm: LoadedModel, batch: PairBatch) -> torch.Tensor:
    """Log-prob of every response token, [rows, seq] (0 outside the response)."""
    out = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                   use_cache=False)
    return token_logps(out.logits, batch.targets) * batch.target_mask


def response_logps(lm: LoadedModel, batches: dict[str, list[PairBatch]]) -> dict[str, list[list[float]]]:
    """Per objective, the response-token log-probs of each pair's chosen reply, then its rejected one."""
    out = {}
    for o, bs in batches.items():
        rows = []
        for b in bs:
            lp = _token_logps(lm, b)
            n = b.n_pairs  # a batch holds every chosen reply, then every rejected one
            for i in range(n):
                rows += [lp[k][b.target_mask[k].bool()].tolist() for k in (i, n + i)]
        out[o] = rows
    return out


def implicit_margins(rows: list[list[float]], base: list[list[float]], beta: float) -> list[float]:
    """Each held-out pair's implicit-reward margin against the base model, from ``response_logps`` rows:
    beta * [(log pi(y_w) - log pi0(y_w)) - (log pi(y_l) - log pi0(y_l))]."""
    return [beta * ((sum(rows[i]) - sum(base[i])) - (sum(rows[i + 1]) - sum(base[i + 1])))
            for i in range(0, len(rows), 2)]


# --------------------------------------------------------------------------------------------- the sweep

class Sweep:
    def __init__(self, lm: LoadedModel, methods: list[Method], data: dict[str, PairSet], cfg: SweepConfig,
                 out: str | Path, progress: Optional[ProgressFn] = None,
                 should_stop: Callable[[], bool] = lambda: False, trust_remote_code: bool = False):
        self.lm, self.methods, self.cfg, self.out = lm, methods, cfg, Path(out)
        self.trust_remote_code = trust_remote_code  # for the reward model: the user's explicit choice
        self.progress = progress
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
        self.procs = _Processes()
        if not self.procs.main:
            self.progress = None  # the first process of a sharded sweep reports; the others measure quietly
        if self.procs.main:  # the folder is checked and claimed (its key written) before the others read it
            self.state = self._load_state()
            self._save_state()
        self.procs.wait_for_everyone()
        if not self.procs.main:
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
            state["points"].update(self._saved_points())
            return state
        if self.out.exists() and any(self.out.iterdir()):
            raise SweepError(f"{self.out} exists and is not a sweep folder; choose a new --out.")
        return {"key": self.key, "points": {}, "base": None, "cca": {}}

    def _saved_points(self) -> dict:
        """Every point saved so far, by any process of this sweep or of an earlier, stopped run."""
        points = {}
        for path in sorted(self.out.glob("sweep-points*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    key, rec = json.loads(line)
                except ValueError:
                    break  # the last line of a run killed while writing it: that point is measured again
                points[key] = rec
        return points

    def _save_state(self) -> None:
        """The small part (key, base, CCA); the points go one line each to their own file (``_save_point``)."""
        self.out.mkdir(parents=True, exist_ok=True)
        small = {k: v for k, v in self.state.items() if k != "points"}
        atomic_write_text(self.out / STATE, json.dumps(small))

    def _save_point(self, key: str, rec: dict) -> None:
        """Append one measured point: the cost of saving does not grow with the number of points saved."""
        self.state["points"][key] = rec
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.procs.points_file(self.out), "a") as f:
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
        return response_logps(self.lm, self.batches)

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

    def _lin_gap(self, weights: dict[str, float]) -> float:
        """Mean |log pi_lin - log pi| per response token on the first batch of each objective (mix cleared)."""
        mix = self.mixer.mix(weights).weight_space
        if not mix:
            return 0.0
        gaps = [linearization_gap(self.lm, batches[0], mix, average=True)["gap_mean"]
                for batches in self.batches.values()]
        return sum(gaps) / len(gaps)

    def _pair_margins(self, lp: dict, base: dict) -> dict[str, list[float]]:
        return {o: implicit_margins(lp[o], base[o], self.cfg.beta) for o in self.objectives}

    def _metrics(self, lp: dict, base: dict) -> dict:
        res = {}
        for o, margins in self._pair_margins(lp, base).items():
            res[f"{o}/accuracy"] = sum(_won(m) for m in margins) / len(margins)
            res[f"{o}/margin"] = sum(margins) / len(margins)
        return res

    def _measure(self, weights: dict[str, float], tangent: bool) -> dict:
        self.mixer.set_weights(weights)
        try:
            lp = self._logps()
            gen = self._generate()
        finally:
            self.mixer.clear()
        rec = {**self._metrics(lp, self.state["base"]["logps"]), **gen, "logps": lp}
        if tangent and self.cfg.linearization_gap:
            rec["lin_gap"] = self._lin_gap(weights)
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

    def run(self) -> Optional[dict]:
        """Measure every point not measured yet, starting from the exact base model whatever a caller left
        applied (it is applied again afterwards), on the kernels the linearization gap's JVP needs. Sharded
        over processes (``_Processes``), each measures its share and the first returns the summary (None in the
        others)."""
        kernels = self.lm.forward_ad_kernels() if self.cfg.linearization_gap and any(m.kind == "tangent" for m in self.methods) \
            else nullcontext()
        with self.lm.at_base(), kernels, abort_on_cancel(self.lm, self.should_stop, "the sweep (run it again to resume)"):
            return self._run()

    def _run(self) -> Optional[dict]:
        items = self.plan()
        procs = self.procs
        mine = [it for i, it in enumerate(items) if i % procs.world == procs.rank]  # fixed by the plan, so a resumed
        #                                                                           sharded run shards alike
        total = len(mine) + 1 + (sum(1 for m in self.methods if m.kind != "scalarized") if procs.main else 0)
        done = 0
        phase = Phase(self.progress, "sweep", total)
        if self.state["base"] is None:  # every process needs it for its margins; the first one saves it
            phase.update(done, point="base model")
            self.mixer.clear()
            self.state["base"] = {"logps": self._logps(), **self._generate()}
            if procs.main:
                self._save_state()
        done += 1
        for key, m, x, y, single in mine:
            if key not in self.state["points"]:
                if self.should_stop():
                    raise Cancelled(f"the sweep (saved {done} of {total}; run it again to resume)")
                phase.update(done, point=key)
                t0 = time.perf_counter()
                if m.kind == "scalarized":
                    rec = self._measure({self.names[id(single)]: 1.0}, False)
                else:
                    rec = self._measure(self._weights(m, x, y), m.kind == "tangent")
                rec["seconds"] = round(time.perf_counter() - t0, 2)
                self._save_point(key, rec)
            done += 1
        procs.wait_for_everyone()
        if not procs.main:
            phase.update(total, point="done")
            return None  # the first process gathers the points and writes the results
        self.state["points"].update(self._saved_points())
        for m in self.methods:
            if m.kind != "scalarized" and m.name not in self.state["cca"]:
                if self.should_stop():
                    raise Cancelled(f"the sweep (saved {done} of {total}; run it again to resume)")
                phase.update(done, point=f"{m.name}: representation changes")
                self.state["cca"][m.name] = self._cca(m)
                self._save_state()
            done += 1 if m.kind != "scalarized" else 0
        phase.update(total, point="done")
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
        entry_logps: dict[str, list] = {}  # method -> each entry's logps (None: the base model), for the bootstrap
        for m in self.methods:
            entries = []
            logps = entry_logps.setdefault(m.name, [])
            if m.kind == "scalarized":
                for label, d, share in m.points:
                    rec = pts.get(f"{m.name}|{label}")
                    if rec:
                        entries.append({"label": label, "share": share, **{k: v for k, v in rec.items() if k != "logps"}})
                        logps.append(rec["logps"])
            else:
                for y in self.coords:
                    for x in self.coords:
                        rec = base if x == 0 and y == 0 else pts.get(f"{m.name}|{x:g},{y:g}")
                        if rec is None:
                            continue
                        e = {"x": x, "y": y, **{k: v for k, v in rec.items() if k != "logps"}}
                        if m.kind == "tangent" and x == 0 and y == 0 and cfg.linearization_gap:
                            e["lin_gap"] = 0.0
                        e["disentanglement"] = 0.0 if x == 0 and y == 0 else self._disentanglement(m, x, y)
                        entries.append(e)
                        logps.append(None if rec is base else rec["logps"])
            result["methods"][m.name] = {"kind": m.kind, "points": entries,
                                         "directions": [d.name for d in m.axes()]}
            all_points += [(e[f"{ox}/{metric}"], e[f"{oy}/{metric}"]) for e in entries]
        ref = self._reference(all_points)
        result["reference"] = {"point": list(ref), "metric": metric,
                               "how": "given" if cfg.reference else "the worst value of each objective over all methods' points"}
        for name, info in result["methods"].items():
            p = [(e[f"{ox}/{metric}"], e[f"{oy}/{metric}"]) for e in info["points"]]
            front = pareto_front(p)
            info["pareto"] = [info["points"][i].get("label") or [info["points"][i]["x"], info["points"][i]["y"]] for i in front]
            info["hypervolume"] = hypervolume(p, ref)
            info["smoothness"] = self._smoothness(info)
        result["cca"] = self.state["cca"]
        result["bootstrap"] = self._bootstrap(result, entry_logps)
        return result

    def _reference(self, points: list[tuple[float, float]]) -> tuple[float, float]:
        """The hypervolume reference: the one given, else the worst value of each objective over ``points``."""
        if self.cfg.reference:
            return tuple(self.cfg.reference)
        return min(p[0] for p in points), min(p[1] for p in points)

    def _bootstrap(self, result: dict, entry_logps: dict[str, list], resamples: int = BOOTSTRAP_RESAMPLES,
                   seed: int = 0) -> dict:
        """95% intervals on every method's hypervolume and on the ratio of every two, from the held-out pairs
        resampled with replacement (the same resample for every point, so the methods are compared on the same
        data each time); the reference point is found the same way in each resample as in the result."""
        metric = self.cfg.pareto_metric
        base = self.state["base"]["logps"]
        g = torch.Generator().manual_seed(seed)
        n = {o: len(base[o]) // 2 for o in self.objectives}
        idx = {o: torch.randint(n[o], (resamples, n[o]), generator=g) for o in self.objectives}
        means = {}  # method -> objective -> [entries, resamples]
        value = _won if metric == "accuracy" else float  # what a pair contributes to the metric's mean
        for name, logps in entry_logps.items():
            means[name] = {}
            margins = [self._pair_margins(lp, base) if lp is not None else None for lp in logps]
            for o in self.objectives:
                per_pair = torch.tensor([[value(x) for x in (m[o] if m is not None else [0.0] * n[o])] for m in margins],
                                        dtype=torch.float64).reshape(len(logps), n[o])
                means[name][o] = per_pair[:, idx[o]].mean(-1)
        ox, oy = self.objectives
        volumes: dict[str, list[float]] = {name: [] for name in means}
        for b in range(resamples):
            points = {name: list(zip(m[ox][:, b].tolist(), m[oy][:, b].tolist())) for name, m in means.items()}
            ref = self._reference([p for ps in points.values() for p in ps])
            for name, ps in points.items():
                volumes[name].append(hypervolume(ps, ref))

        def interval(values: list[float]) -> list[float]:
            v = torch.tensor(values, dtype=torch.float64)
            return [float(torch.quantile(v, 0.025)), float(torch.quantile(v, 0.975))]

        out = {"resamples": resamples, "seed": seed, "pairs": n, "metric": metric,
               "hypervolume": {name: interval(v) for name, v in volumes.items()}, "ratios": {}}
        for a in volumes:
            for b in volumes:
                if a == b or not result["methods"][b]["hypervolume"]:
                    continue
                ratios = [u / w for u, w in zip(volumes[a], volumes[b]) if w > 0]
                if ratios:
                    out["ratios"][f"{a}/{b}"] = {"value": result["methods"][a]["hypervolume"] / result["methods"][b]["hypervolume"],
                                                 "interval": interval(ratios), "resamples": len(ratios)}
        return out

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
