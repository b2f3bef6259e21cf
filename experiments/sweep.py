r"""Budget sweeps and Pareto fronts: size vs metric, uniform vs allocated.

For each method family in `config.sweep.families` (quant, sparsity, lowrank)
the sweep builds one candidate table over the family's layers
(`compressjax.allocate.build_table`: exact bytes of every (layer, candidate)
and its sensitivity), then evaluates points along the size axis:

  quant     for every budget in sweep.quant.bits (average bits per weight
            over the allocated layers): the allocation (exact solver, and the
            greedy baseline when it differs); the uniform settings of
            sweep.quant.uniform (also with the head at sweep.quant.head), and
            the allocation at each uniform's true size
  mixed     the same, with sparse+quant mixtures (sweep.mixed.mixtures, e.g.
            wanda50+int4_g64, nm24+int4_c) among every layer's candidates
  sparsity  for every target S in sweep.sparsity.targets: uniform S, OWL, ERK
            and the allocation at uniform S's true size (sparsity transform
            sweep.sparsity.method: wanda, magnitude or sparsegpt)
  lowrank   for every parameter ratio: uniform, energy-allocated ranks (one
            common energy fraction) and the solver's ranks at the same size

Calibration statistics are captured once and shared by every family and
point; each point is cached in <workdir>/points keyed by everything that
determines its tree (baseline, calibration, per-layer settings, evaluation),
and tables in <workdir>/tables, so a rerun with more budgets evaluates only
the new points. Points are evaluated on the exactly materialized weights
(`materialize_tree`: one compiled evaluation for every point; the sizes come
from the compressed tree, whose realized bytes are checked against the plan).
Writes sweep.json, sweep.md, pareto.png and TensorBoard HParams (tb/).

    python -m experiments.sweep --workdir=/tmp/cj_sweep
    python -m experiments.sweep --workdir=/tmp/cj_sweep \
        --config.sweep.families=quant --config.sweep.quant.bits=2.5,3,3.5

The task (model, float baseline, metric, calibration and loss batches) comes
from `experiments.lm_task` (the default experiment's `harness.Task`); pass
`run_sweep(..., task=)` any other harness Task (with `training` for the loss
proxies) to sweep another model.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable, Sequence

from absl import app
import jax
import numpy as np

import compressjax as cj
from compressjax import allocate as A
from compressjax.core.tree import leaves_with_paths, materialize_tree
from experiments import harness

T = cj.transforms
Log = Callable[[str], None]
CACHE_VERSION = 1

_DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
    "sweep.py")


# ---------------------------------------------------------------------------
# The task: the experiments harness's Task (experiments.lm_task by default)
# ---------------------------------------------------------------------------

def _lm_task(c, workdir: str, log: Log = print):
  """The byte-LM `harness.Task` of config `c` (the default experiment's:
  same data, model, cached baseline and perplexity evaluator)."""
  from experiments import lm_task
  return lm_task.task(c, workdir, log)


# ---------------------------------------------------------------------------
# Shared state of one sweep
# ---------------------------------------------------------------------------

class Calibrated:
  """A calibrated transform builder (T.gptq, T.wanda, ...) that captures the
  shared statistics only when first called, so cached points need none."""

  def __init__(self, sw: "Sweep", fn: Callable):
    self.sw, self.fn = sw, fn
    self.__name__ = fn.__name__

  def __call__(self, **kw):
    return self.fn(self.sw.stats, **kw)


class Sweep:
  """Config, task and what every family shares (stats, sensitivities)."""

  def __init__(self, config, task, workdir: str, log: Log = print):
    self.config = config
    self.sc = config.sweep
    self.task = task
    self.workdir = workdir
    self.log = log
    self._memo: dict = {}
    self._builders: dict = {}

  def calibrated(self, fn: Callable) -> Calibrated:
    """One builder object per transform (plans group stages by identity)."""
    if fn not in self._builders:
      self._builders[fn] = Calibrated(self, fn)
    return self._builders[fn]

  def memo(self, key, make):
    if key not in self._memo:
      self._memo[key] = make()
    return self._memo[key]

  @functools.cached_property
  def stats(self) -> dict:
    """The task's calibration statistics, shared by every point: the
    harness's (same draw, the task's capture method)."""
    return harness.Context(self.config, self.task, self.workdir,
                           self.log).stats

  @functools.cached_property
  def loss_batches(self) -> list:
    s = self.sc.sensitivity
    fn = self.task.training.batches(s.batch_size, s.seed)
    return [np.asarray(fn(i)) for i in range(s.batches)]

  def fisher(self, rules) -> dict:
    def make():
      t0 = time.time()
      f = A.fisher_diagonal(self.task.training.loss, self.task.baseline,
                            self.loss_batches, rules=rules)
      self.log(f"  Fisher diagonal in {time.time() - t0:.1f}s")
      return f
    return self.memo(("fisher", repr(rules)), make)

  def trace(self, rules) -> dict:
    def make():
      t0 = time.time()
      s = self.sc.sensitivity
      tr = A.hessian_trace(self.task.training.loss, self.task.baseline,
                           self.loss_batches, key=jax.random.key(s.seed),
                           samples=s.trace_samples, rules=rules)
      self.log(f"  Hutchinson traces ({s.trace_samples} samples) in "
               f"{time.time() - t0:.1f}s")
      return tr
    return self.memo(("trace", repr(rules)), make)

  # -- cache -------------------------------------------------------------------
  def key(self, *parts) -> str:
    c = self.config
    blob = json.dumps(dict(v=CACHE_VERSION, baseline=self.task.key,
                           calib=c.calib.to_dict(), eval=c.eval.to_dict(),
                           parts=parts), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]

  def cached(self, kind: str, key: str, make: Callable[[], Any]) -> tuple:
    path = os.path.join(self.workdir, kind, key + ".json")
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f), True
    value = make()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(value, f)
    os.replace(tmp, path)  # a complete entry or none
    return value, False


# ---------------------------------------------------------------------------
# Families
# ---------------------------------------------------------------------------

def _floats(spec) -> list[float]:
  if isinstance(spec, (int, float)):
    return [float(spec)]
  return [float(x) for x in str(spec).split(",") if x.strip()]


def _names(spec) -> list[str]:
  return [x.strip() for x in str(spec).split(",") if x.strip()]


_QUANT_NAME = re.compile(r"(?:int(\d)|([a-z0-9_]+?))(?:_(c|g\d+))?")


def quant_setting(name: str) -> dict:
  """'int3_g128' -> bits 3, groups of 128; 'int4_c' -> per output channel;
  'nf4_g64' / 'fp8_e4m3' / 'mxfp4' -> that format (compressjax.formats)."""
  m = _QUANT_NAME.fullmatch(name)
  if not m:
    raise ValueError(f"cannot read quant candidate {name!r}; use e.g. "
                     "int3_g128, int4_c, nf4_g64, mxfp4")
  bits, fmt, gran = m.groups()
  group = None if gran in (None, "c") else int(gran[1:])
  if bits is not None:
    return dict(bits=int(bits), format=None, group_size=group)
  return dict(format=fmt, group_size=group)


@dataclasses.dataclass
class Point:
  """One evaluation: a curve (method) at a budget knob (target)."""

  family: str
  method: str
  target: float
  settings: dict                       # JSON: determines the tree
  transform: Callable[[], cj.Transform]
  plan: A.Allocation | None = None     # checked: realized == planned bytes
  layers: tuple[str, ...] = ()         # the family's allocated layers
  extra: dict = dataclasses.field(default_factory=dict)
  details: Callable[[], dict] | None = None  # computed with the point

  def compress(self, params: Any) -> Any:
    """The point's tree; a plan's (`Allocation.apply`) is checked to store
    the planned bytes."""
    if self.plan is not None:
      return self.plan.apply(params)
    return self.transform().apply(params)


def _plan_settings(plan: A.Allocation) -> dict:
  return {p: [c.label, [(A.candidates.builder_name(s.build),
                         sorted((k, repr(v)) for k, v in s.config.items()))
                        for s in c.stages]]
          for p, c in plan.chosen.items()}


class Family:
  """A method family: its layers, candidates and points."""

  name = ""
  proxy_default = "fisher"

  def __init__(self, sw: Sweep):
    self.sw = sw
    self.fc = getattr(sw.sc, self.name)

  def rules(self) -> list:
    return []

  def candidates(self) -> list[A.Candidate]:
    raise NotImplementedError

  def points(self, table: A.Table) -> list[Point]:
    raise NotImplementedError

  @property
  def proxy(self) -> str:
    return self.fc.get("proxy", None) or self.sw.sc.proxy

  # -- table (cached numbers; candidates rebuilt by label) -------------------
  def table(self) -> A.Table:
    sw, sc = self.sw, self.sw.sc
    cands = self.candidates()
    proxies = {"output", self.proxy}
    if sc.ground_truth:
      proxies |= {"loss", "fisher", "output"}
      if sc.sensitivity.trace_samples:
        proxies.add("hawq")
    desc = [(c.label, [(A.candidates.builder_name(s.build),
                        sorted((k, repr(v)) for k, v in s.config.items()))
                       for s in c.stages]) for c in cands]
    key = sw.key("table", self.name, desc, sorted(proxies),
                 sc.sensitivity.to_dict(), self.rules_desc())

    def make():
      t0 = time.time()
      rules = self.rules()
      kw = dict(stats=sw.stats)
      if "fisher" in proxies:
        kw["fisher"] = sw.fisher(rules)
      if "hawq" in proxies:
        kw["hessian_trace"] = sw.trace(rules)
      if "loss" in proxies:
        kw.update(loss_fn=sw.task.training.loss, batches=sw.loss_batches)
      bar = Progress(f"{self.name} table", sw.log)
      table = A.build_table(sw.task.baseline, cands, rules=rules,
                            drop_unfit=True, progress=bar.update, **kw)
      bar.close()
      dropped = len(cands) * len(table.layers) - sum(
          len(l.candidates) for l in table.layers)
      sw.log(f"  {self.name} table: {len(table.layers)} layers x "
             f"{len(cands)} candidates in {time.time() - t0:.1f}s"
             + (f" ({dropped} that did not fit a layer left out)"
                if dropped else ""))
      return [dict(path=l.path, labels=[c.label for c in l.candidates],
                   nbytes=[int(b) for b in l.nbytes],
                   scores={k: [float(x) for x in v]
                           for k, v in l.scores.items()})
              for l in table.layers]

    rows, hit = sw.cached("tables", key, make)
    if hit:
      sw.log(f"  {self.name} table: reused {key}")
    by_label = {c.label: c for c in cands}
    shapes = {p: tuple(x.shape) for p, x in leaves_with_paths(
        sw.task.baseline)}
    from compressjax.core.base import array_nbytes
    dense = {p: array_nbytes(x) for p, x in leaves_with_paths(
        sw.task.baseline)}
    return A.Table(tuple(A.LayerOptions(
        path=r["path"], shape=shapes[r["path"]], dense_bytes=dense[r["path"]],
        candidates=tuple(by_label[x] for x in r["labels"]),
        nbytes=np.asarray(r["nbytes"], np.int64),
        scores={k: np.asarray(v) for k, v in r["scores"].items()})
        for r in rows))

  def rules_desc(self):
    return [(r[0], r[1]) if isinstance(r, tuple) else repr(r)
            for r in self.rules()]

  # -- helpers for points --------------------------------------------------------
  def allocated(self, table, target, budget_bytes, tag="") -> list[Point]:
    """The exact plan (and the greedy one when it differs) at a budget."""
    out = []
    plans = {}
    for solver in _names(self.sw.sc.solvers):
      plans[solver] = A.solve(table, bytes=budget_bytes, proxy=self.proxy,
                              solver=solver)
    objs = {s: p.objective() for s, p in plans.items()}
    seen = {}
    for solver, plan in plans.items():
      labels = tuple(plan.labels.values())
      if labels in seen:
        continue  # greedy found the same plan: one point
      seen[labels] = solver
      out.append(Point(
          self.name, f"allocated ({solver}){tag}", target,
          dict(kind="plan", plan=_plan_settings(plan)),
          plan.transform, plan, table.paths,
          extra=dict(budget_bytes=int(budget_bytes), proxy=self.proxy,
                     objective=objs[solver], objectives=objs)))
    return out

  def labelled(self, table, method, target, labels) -> Point:
    plan = A.fixed(table, labels, proxy=self.proxy, name=method)
    return Point(self.name, method, target,
                 dict(kind="plan", plan=_plan_settings(plan)),
                 plan.transform, plan, table.paths,
                 extra=dict(proxy=self.proxy, objective=plan.objective()))


class QuantFamily(Family):
  name = "quant"

  def builder(self):
    m = self.fc.method
    if m == "rtn":
      return T.quantize
    if m == "gptq":
      return self.sw.calibrated(T.gptq)
    raise ValueError(f"sweep.quant.method must be rtn or gptq, not {m!r}")

  def candidates(self):
    b = self.builder()
    names = _names(self.fc.candidates)
    return [A.candidate(b, n, **quant_setting(n)) for n in names]

  def points(self, table):
    out = []
    n = table.n_weights
    for bpw in _floats(self.fc.bits):
      out += self.allocated(table, bpw, A.resolve_budget(
          table, bits_per_weight=bpw))
    head = [p for p in table.paths
            if self.sw.task.head and re.fullmatch(self.sw.task.head, p)]
    for lab in _names(self.fc.uniform):
      variants = [("uniform", {p: lab for p in table.paths})]
      if self.fc.head and head and lab != self.fc.head:
        variants.append((f"uniform (head {self.fc.head})", {
            p: self.fc.head if p in head else lab for p in table.paths}))
      for method, labels in variants:
        u = self.labelled(table, method, 0.0, labels)
        u.target = 8.0 * u.plan.planned_bytes / n
        out.append(u)
        if self.fc.match_uniform:
          out += self.allocated(table, u.target, u.plan.planned_bytes,
                                tag=" @ " + method)
    return out


class SparsityFamily(Family):
  name = "sparsity"

  def rules(self):
    head = self.sw.task.head
    return [] if (self.fc.prune_head or not head) else [(head, None)]

  def builder(self):
    m = self.fc.method
    if m == "wanda":
      return self.sw.calibrated(T.wanda)
    if m == "sparsegpt":
      return self.sw.calibrated(T.sparsegpt)
    if m == "magnitude":
      return T.sparsify
    raise ValueError(f"sweep.sparsity.method must be wanda, sparsegpt or "
                     f"magnitude, not {m!r}")

  def candidates(self):
    levels = sorted(set(_floats(self.fc.levels)) | set(_floats(
        self.fc.targets)))
    return [A.candidate(self.builder(), f"{s:.0%}", sparsity=s)
            for s in levels]

  def points(self, table):
    out = []
    sw = self.sw
    b = self.builder()
    for s in _floats(self.fc.targets):
      u = self.labelled(table, "uniform", s,
                        {p: f"{s:.0%}" for p in table.paths})
      out.append(u)
      out += self.allocated(table, s, u.plan.planned_bytes)
      for method in _names(self.fc.nonuniform):
        if method not in ("owl", "erk"):
          raise ValueError(f"sweep.sparsity.nonuniform: owl or erk, not "
                           f"{method!r}")
        # settings name the inputs (deterministic given baseline and
        # calibration): a cached point needs no statistics
        settings = dict(kind=method, target=s, method=self.fc.method,
                        rules=self.rules_desc())
        if method == "owl":
          settings.update(m=self.fc.owl_m, lam=self.fc.owl_lam)
        sp = functools.partial(self.sparsities, method, s)
        out.append(Point(
            self.name, method, s, settings,
            lambda sp=sp: b(rules=A.sparsity_rules(sp()), default=None),
            None, table.paths, details=lambda sp=sp: dict(
                weighted_sparsity=A.weighted_sparsity(sw.task.baseline,
                                                      sp()),
                sparsities=sp())))
    return out

  def sparsities(self, method: str, s: float) -> dict:
    sw = self.sw

    def make():
      if method == "owl":
        return A.owl_sparsities(sw.task.baseline, sw.stats, s,
                                m=self.fc.owl_m, lam=self.fc.owl_lam,
                                rules=self.rules())
      return A.erk_sparsities(sw.task.baseline, s, rules=self.rules())
    return sw.memo(("sparsities", method, s), make)


class LowRankFamily(Family):
  name = "lowrank"

  def builder(self):
    m = self.fc.method
    if m == "svd_llm":
      return self.sw.calibrated(T.svd_llm)
    if m == "svd":
      return T.low_rank
    raise ValueError(f"sweep.lowrank.method must be svd_llm or svd, not "
                     f"{m!r}")

  def candidates(self):
    ratios = sorted(set(_floats(self.fc.levels)) | set(_floats(
        self.fc.targets)))
    return [A.candidate(self.builder(), f"r{r:g}", rank_ratio=r)
            for r in ratios]

  def points(self, table):
    out = []
    sw = self.sw
    for r in _floats(self.fc.targets):
      u = self.labelled(table, "uniform", r,
                        {p: f"r{r:g}" for p in table.paths})
      out.append(u)
      out += self.allocated(table, r, u.plan.planned_bytes)
      # energy ranks at the uniform's factor parameters (4 bytes each)
      itemsize = {p: np.dtype(x.dtype).itemsize for p, x in
                  leaves_with_paths(sw.task.baseline)}
      budget = sum(int(l.nbytes[l.index(f"r{r:g}")]) // itemsize[l.path]
                   for l in table.layers)
      ranks = functools.partial(self.energy, budget)
      b = self.builder()
      out.append(Point(
          self.name, "energy", r, dict(kind="energy", method=self.fc.method,
                                       budget=budget, rules=self.rules_desc()),
          lambda ranks=ranks: b(rules=A.rank_rules(ranks()), default=None),
          None, table.paths, extra=dict(budget_params=budget),
          details=lambda ranks=ranks: dict(ranks=ranks(), factor_params=(
              A.factor_params(sw.task.baseline, ranks())))))
    return out

  def energy(self, budget: int) -> dict:
    sw = self.sw
    return sw.memo(("energy", budget), lambda: A.energy_ranks(
        sw.task.baseline, budget=budget,
        stats=sw.stats if self.fc.method == "svd_llm" else None,
        rules=self.rules()))


_MIX_SPARSE = re.compile(r"(?:(wanda|magnitude)(\d+)|nm(\d)(\d))")


class MixedFamily(QuantFamily):
  """Bits plus sparse+quant mixtures ('wanda50+int4_g64': Wanda 50% then
  int4 groups of 64 kept values; 'nm24+int4_c': magnitude 2:4 then int4 per
  channel) among the candidates of every layer, under bits budgets."""

  name = "mixed"

  def mixture(self, name: str) -> A.Candidate:
    sparse, _, quant = name.partition("+")
    m = _MIX_SPARSE.fullmatch(sparse)
    if not m or not quant:
      raise ValueError(f"cannot read mixture {name!r}; use e.g. "
                       "wanda50+int4_g64 or nm24+int4_c")
    method, pct, n, mm = m.groups()
    if method == "wanda":
      first = (self.sw.calibrated(T.wanda), dict(sparsity=int(pct) / 100))
    elif method == "magnitude":
      first = (T.sparsify, dict(sparsity=int(pct) / 100))
    else:
      first = (T.sparsify, dict(pattern="nm", n=int(n), m=int(mm)))
    return A.mixture(name, first, (self.builder(), quant_setting(quant)))

  def candidates(self):
    return super().candidates() + [self.mixture(n) for n in
                                   _names(self.fc.mixtures)]


FAMILIES = {f.name: f for f in (QuantFamily, SparsityFamily, LowRankFamily,
                                MixedFamily)}


# ---------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------

class Progress:
  """A progress bar (tqdm when installed and stderr is a terminal), else a
  log line every ~10%."""

  def __init__(self, desc: str, log: Log, total: int | None = None):
    self.desc, self.log, self.total = desc, log, total
    self.bar, self.last, self.start = None, -1, time.time()
    if sys.stderr.isatty():
      try:
        from tqdm import tqdm
        self.bar = tqdm(total=total, desc=desc, leave=False)
      except ImportError:
        pass

  def update(self, done: int, total: int | None = None, note: str = ""):
    total = total or self.total
    if self.bar is not None:
      if total and self.bar.total != total:
        self.bar.total = total
      self.bar.n = done
      self.bar.set_postfix_str(note, refresh=True)
      return
    step = int(10 * done / max(total or 1, 1))
    if step != self.last or done == total:
      self.last = step
      el = time.time() - self.start
      eta = el / max(done, 1) * ((total or done) - done)
      self.log(f"  {self.desc}: {done}/{total} ({el:.0f}s, ETA {eta:.0f}s)"
               + (f" {note}" if note else ""))

  def close(self):
    if self.bar is not None:
      self.bar.close()


# ---------------------------------------------------------------------------
# Running points
# ---------------------------------------------------------------------------

def _measure(sw: Sweep, point: Point, tree) -> dict:
  leaves = dict(leaves_with_paths(tree))
  from compressjax.core.base import array_nbytes
  nbytes = sum(array_nbytes(leaves[p]) for p in point.layers)
  nw = sum(math.prod(leaves[p].shape) for p in point.layers)
  m = harness.measure(sw.task.baseline, tree)
  return dict(layer_bytes=int(nbytes),
              bits_per_weight=8.0 * nbytes / max(nw, 1),
              bits_per_weight_kernels=m["bits_per_weight"],
              bits_per_weight_model=m["bits_per_weight_model"],
              size_bytes=m["size_bytes"],
              compression_ratio=m["compression_ratio"])


def run_point(sw: Sweep, point: Point) -> tuple[dict, bool]:
  key = sw.key("point", point.family, point.settings,
               bool(sw.sc.materialize))

  def make():
    t0 = time.time()
    tree = jax.block_until_ready(point.compress(sw.task.baseline))
    compress_s = time.time() - t0
    sizes = _measure(sw, point, tree)
    t0 = time.time()
    result = sw.task.evaluate(materialize_tree(tree) if sw.sc.materialize
                              else tree)
    return dict(**result, **sizes, compress_seconds=round(compress_s, 3),
                eval_seconds=round(time.time() - t0, 3),
                **(point.details() if point.details else {}))

  return sw.cached("points", key, make)


def run_sweep(config, workdir: str, log: Log = print, task=None) -> dict:
  """Runs the sweep of `config` in `workdir`; returns sweep.json's dict."""
  start = time.time()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  sc = config.sweep
  families = _names(sc.families)
  unknown = [f for f in families if f not in FAMILIES]
  if unknown:
    raise ValueError(f"unknown families {unknown}; use {sorted(FAMILIES)}")
  task = task or _lm_task(config, workdir, log)
  sw = Sweep(config, task, workdir, log)
  float_point, _ = sw.cached("points", sw.key("float"), lambda: dict(
      **task.evaluate(task.baseline)))
  log(f"float baseline: {task.metric} {float_point['value']:.4f}")
  records, tables = [], {}
  for name in families:
    fam = FAMILIES[name](sw)
    log(f"[{name}] candidates and sensitivities")
    table = fam.table()
    tables[name] = table
    points = fam.points(table)
    bar = Progress(f"{name} points", log, len(points))
    hits = 0
    for i, pt in enumerate(points, 1):
      res, hit = run_point(sw, pt)
      hits += hit
      rec = dict(family=pt.family, method=pt.method, target=pt.target,
                 metric=task.metric, **res, cached=hit, **pt.extra)
      if pt.plan is not None:
        rec["planned_bytes"] = pt.plan.planned_bytes
        rec["choice"] = pt.plan.labels
      records.append(rec)
      bar.update(i, note=f"{pt.method} {pt.target:g}: "
                 f"{res['value']:.3f} @ {res['bits_per_weight']:.3f} b/w")
    bar.close()
    log(f"[{name}] {len(points)} points ({hits} cached)")
  out = dict(metric=task.metric, float=float_point["value"],
             header=task.header, seconds=round(time.time() - start, 1),
             records=records,
             correlations={n: A.correlations(t) for n, t in tables.items()
                           if "loss" in t.proxies},
             solvers=solver_report(records))
  with open(os.path.join(workdir, "sweep.json"), "w") as f:
    json.dump(out, f, indent=2, default=float)
  write_markdown(os.path.join(workdir, "sweep.md"), out)
  write_plot(os.path.join(workdir, "pareto.png"), out)
  if sc.tensorboard:
    write_hparams(os.path.join(workdir, "tb"), out)
  log(f"sweep: {len(records)} points in {out['seconds']:.1f}s; wrote "
      f"{os.path.join(workdir, 'sweep.md')}")
  return out


def solver_report(records: list[dict]) -> list[dict]:
  """Exact vs greedy objectives at every allocated budget."""
  out = []
  for r in records:
    objs = r.get("objectives")
    if objs and r["method"].startswith("allocated"):
      if any(o["family"] == r["family"] and o["budget_bytes"] ==
             r["budget_bytes"] for o in out):
        continue
      out.append(dict(family=r["family"], budget_bytes=r["budget_bytes"],
                      target=r["target"], **{k: float(v)
                                             for k, v in objs.items()}))
  return out


# ---------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------

def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
  """Indices of the points no other point beats on both size and metric
  (lower is better for both), by increasing size."""
  order = sorted(range(len(points)), key=lambda i: (points[i][0],
                                                    points[i][1]))
  front, best = [], math.inf
  for i in order:
    if points[i][1] < best:
      front.append(i)
      best = points[i][1]
  return front


def write_markdown(path: str, out: dict) -> None:
  lines = ["# compressjax sweep: size vs " + out["metric"], ""]
  lines += [f"- **{k}**: {v}" for k, v in out["header"].items()]
  lines += [f"- **float {out['metric']}**: {out['float']:.4f}",
            f"- **seconds**: {out['seconds']}", "",
            "bits/w: over each family's allocated layers, from the bytes the "
            "compressed tree stores. Allocated rows: the solver's plan under "
            "the budget; '@ uniform' rows use a uniform row's true size as "
            "the budget.", ""]
  lines += [f"| family | method | target | {out['metric']} | bits/w | "
            "layer KiB | model KiB | objective |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
  for r in sorted(out["records"], key=lambda r: (r["family"],
                                                 r["bits_per_weight"])):
    obj = r.get("objective")
    lines.append(
        f"| {r['family']} | {r['method']} | {r['target']:g} | "
        f"{r['value']:.4f} | {r['bits_per_weight']:.4f} | "
        f"{r['layer_bytes'] / 1024:.1f} | {r['size_bytes'] / 1024:.1f} | "
        f"{'-' if obj is None else f'{obj:.4g}'} |")
  if out["solvers"]:
    lines += ["", "## Exact vs greedy (summed proxy score, lower is better)",
              "", "| family | budget bytes | " + " | ".join(
                  k for k in out["solvers"][0] if k not in (
                      "family", "budget_bytes", "target")) + " |"]
    keys = [k for k in out["solvers"][0] if k not in ("family",
                                                      "budget_bytes",
                                                      "target")]
    lines.append("|---|---:|" + "---:|" * len(keys))
    for s in out["solvers"]:
      lines.append(f"| {s['family']} | {s['budget_bytes']:,} | " + " | ".join(
          f"{s[k]:.6g}" for k in keys) + " |")
  for fam, corr in out["correlations"].items():
    lines += ["", f"## Proxy vs exact loss change ({fam}), Spearman's rho",
              "", "| proxy | pooled | across layers (mean) |",
              "|---|---:|---:|"]
    for name, c in corr.items():
      lines.append(f"| {name} | {c['pooled']:.3f} | "
                   f"{c['across_layers']:.3f} |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def write_plot(path: str, out: dict) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fams = sorted({r["family"] for r in out["records"]})
  if not fams:
    return
  fig, axes = plt.subplots(1, len(fams), figsize=(5.5 * len(fams), 4.5),
                           squeeze=False)
  curve = lambda r: r["method"].split(" @ ")[0]  # '@ uniform': same curve
  # one color per method in every panel
  color = {m: f"C{i}" for i, m in enumerate(sorted(
      {curve(r) for r in out["records"]}))}
  for ax, fam in zip(axes[0], fams):
    recs = [r for r in out["records"] if r["family"] == fam]
    for m in sorted({curve(r) for r in recs}):
      pts = sorted((r["bits_per_weight"], r["value"]) for r in recs
                   if curve(r) == m)
      style = "--" if m.startswith("uniform") else "-"
      ax.plot(*zip(*pts), style, marker="o", ms=4, label=m, color=color[m])
    allp = [(r["bits_per_weight"], r["value"]) for r in recs]
    front = [allp[i] for i in pareto_front(allp)]
    ax.step(*zip(*front), where="post", color="k", lw=0.8, alpha=0.5,
            label="Pareto front")
    ax.axhline(out["float"], color="gray", lw=0.8, ls=":", label="float")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (allocated layers, true bytes)")
    ax.set_ylabel(out["metric"])
    ax.set_title(fam)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_hparams(logdir: str, out: dict) -> None:
  from tensorboardX import SummaryWriter
  w = SummaryWriter(logdir)
  try:
    for i, r in enumerate(out["records"]):
      hp = dict(family=r["family"], method=r["method"],
                target=float(r["target"]), proxy=str(r.get("proxy", "")))
      w.add_hparams(hp, {"hparam/" + out["metric"]: float(r["value"]),
                         "hparam/bits_per_weight": float(r["bits_per_weight"]),
                         "hparam/size_kib": r["size_bytes"] / 1024},
                    name=f"{i:03d}_{r['family']}_{harness.safe_name(r['method'])}_"
                    f"{r['target']:g}")
  finally:
    w.close()


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def main(argv):
  config, workdir = harness.setup_main(argv)  # pinned XLA flags, jax cache
  run_sweep(config, workdir)
  with open(os.path.join(workdir, "sweep.md")) as fh:
    print(fh.read())


if __name__ == "__main__":
  harness.define_flags(_DEFAULT_CONFIG, "runs/sweep")
  app.run(main)
