"""Training benchmark (issue 5): the cost and the benefit of training with
compression on the default LM (configs/default.py: d_model 128, 4 layers,
batch 8 x 128 bytes), every figure a ratio or a comparison measured in one run.

Timing part (random init; every jitted step timed with block_until_ready,
--warmup calls first, then --repeats rounds, each round timing every step
once, so a change of machine load hits all of them alike; medians):
  1. QAT: value_and_grad of the next-token loss through `compressjax.run` on
     `qat.qat(4, group_size=128)` (LSQ), gradient w.r.t. the float children
     (partition_float / combine), + adamw; vs the same float step on
     `model.apply`. Goal: ratio <= 1.25.
  2. RigL / SET at --sparsity: the wrapper's ordinary step and its mask-update
     step timed apart (the update forced by the state's step count),
     amortized over P = --update-every: (t_regular (P - 1) + t_update) / P,
     vs the dense float step. Goal: <= 1.05.
  3. Distillation: the KD step (`distill_loss_fn`, teacher and student of the
     default config) vs the jitted teacher forward + the student's float
     step. Goal: KD <= 1.10 x (teacher + student).

Quality part (--quality; minutes on 2 cores): from the float baseline cached
in --workdir by `python -m experiments.compress_lm --workdir=runs/default`
(trained and cached there when missing), every contender fine-tuned the same
--steps S on the same batches with the same optimizer (adamw without weight
decay, peak --lr, linear warmup then cosine to 0.1 x), validation perplexity
by the experiment's `make_eval_step` / `evaluate`:
  4. QAT int4 g128 (LSQ, started from the RTN tree with `qat.from_ptq`, head at
     8 bits per channel as the experiment's int4_g128 row, exported to
     QArrays) vs RTN vs float: fraction of the RTN gap closed. Goal >= 0.5.
     Also shown: the float model fine-tuned the same S steps (QAT trains the
     embeddings, norms and biases too, so part of what it gains could be
     plain extra training; the stricter fraction uses that model).
  5. Distillation: the 2:4 magnitude-pruned baseline (the experiment's
     nm_2_4 row, mask fixed: its NMSparseArray values are trained through
     partition_float / combine) fine-tuned with KD from the float teacher vs
     on next-token CE. Goal: KD perplexity lower.
  6. RigL at --sparsity: one-shot magnitude pruning of the baseline (per
     layer, head dense as the experiment's sparse rows), then S steps of RigL
     (masks updated every --rigl-every steps until 0.75 S, drop fraction
     --rigl-drop, cosine-decayed) vs S steps with that mask fixed. Goal: RigL
     closer to the dense perplexity.

  python bench/training.py [--part timing|quality|all] [--repeats 20]
                           [--warmup 3] [--update-every 100] [--json out.json]
  python bench/training.py --part quality [--steps 200] [--lr 3e-4]
                           [--workdir runs/default] [--baseline-steps N]
                           [--quality-parts qat,kd,rigl]
  python bench/training.py --quality          # both parts (= --part all)

--baseline-steps N trains (and caches under --workdir) an N-step baseline
instead, for smoke runs where none is cached.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import compressjax as cj
from compressjax.data import stdlib_text
from compressjax.models import transformer
from compressjax.train import distill, loop, qat, sparse
from configs import default as default_config
from experiments import harness
from experiments import lm_task as E
from experiments import rows

GOALS = {
    "qat_step_ratio": ("<=", 1.25),
    "rigl_step_ratio_amortized": ("<=", 1.05),
    "set_step_ratio_amortized": ("<=", 1.05),
    "kd_step_ratio": ("<=", 1.10),
    "qat_gap_closed": (">=", 0.5),
    "kd_minus_ce_ppl": ("<", 0.0),
    "rigl_minus_fixed_dense_distance": ("<", 0.0),
}


# ---------------------------------------------------------------- shared


def finetune_optimizer(lr: float, steps: int) -> optax.GradientTransformation:
  """Same for every contender: clipped adamw, no weight decay (a decayed LSQ
  step or sparse value would be pulled to 0), warmup then cosine."""
  warmup = max(1, round(0.05 * steps))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup,
      decay_steps=max(steps, warmup + 1), end_value=0.1 * lr)
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.0))


def ce(logits, batch):
  """Mean next-byte cross entropy of logits for batch[:, :-1]."""
  return transformer.next_token_loss(logits, batch[:, 1:]).mean()


def make_step(loss_fn, opt):
  """jit(params, opt_state, batch) -> (params, opt_state, loss)."""

  @jax.jit
  def step(p, s, batch):
    loss, g = jax.value_and_grad(loss_fn)(p, batch)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  return step


def interleaved_medians(fns: dict, warmup: int, repeats: int) -> dict:
  """Median seconds per call of each thunk; rounds time every thunk once."""
  for f in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(f())  # the first call compiles
  ts = {k: [] for k in fns}
  for _ in range(repeats):
    for k, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      ts[k].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in ts.items()}


def figure(name: str, value: float, detail: str = "") -> dict:
  op, target = GOALS[name]
  ok = {"<=": value <= target, ">=": value >= target,
        "<": value < target}[op] if math.isfinite(value) else False
  return dict(figure=name, value=value, goal=f"{op} {target:g}",
              status="PASS" if ok else "FAIL", detail=detail)


# ---------------------------------------------------------------- timing


def timing_part(a, c, log) -> tuple[dict, list]:
  model = E.build_model(c)
  seq, bs = c.data.seq_len, c.train.batch_size
  train_data, _ = stdlib_text.load(max_bytes=c.data.max_bytes,
                                   max_val_bytes=c.data.max_val_bytes,
                                   val_files=c.data.val_files)
  batch = jnp.asarray(next(stdlib_text.train_batches(train_data, seq, bs,
                                                     seed=c.seed)))
  init = jax.jit(model.init)
  variables = init(jax.random.key(c.seed), jnp.zeros((1, seq), jnp.int32))
  opt = finetune_optimizer(a.lr, 1000)
  P = a.update_every

  # 1. float vs QAT
  float_loss = lambda p, b: ce(model.apply(p, b[:, :-1]), b)
  float_step = make_step(float_loss, opt)
  f_state = opt.init(variables)
  qtree = jax.jit(qat.qat(4, group_size=128).apply)(variables)
  flo, rest = cj.partition_float(qtree)
  qat_step = make_step(
      lambda p, b: ce(cj.run(model, cj.combine(p, rest), b[:, :-1]), b), opt)
  q_state = opt.init(flo)

  # 2. RigL / SET: the count in the state picks the branch of the step
  def sparse_steps(tx):
    st = tx.init(variables)
    p = sparse.masked_params(variables, st)

    @jax.jit
    def step(p, st, b):
      loss, g = jax.value_and_grad(lambda p: ce(model.apply(
          sparse.masked_params(p, st), b[:, :-1]), b))(p)
      u, st2 = tx.update(g, st, p)
      return optax.apply_updates(p, u), st2, loss

    regular = st.replace(count=jnp.asarray(1, jnp.int32))
    update = st.replace(count=jnp.asarray(P, jnp.int32))
    moved = sum(int(jnp.sum(m1 != m0)) for m0, m1 in zip(
        jax.tree.leaves(st.masks), jax.tree.leaves(step(p, update, batch)[1]
                                                   .masks)))
    return step, p, regular, update, moved

  kw = dict(end_step=10 * P, update_every=P, seed=c.seed)
  r_step, r_p, r_reg, r_upd, r_moved = sparse_steps(
      sparse.rigl(opt, a.sparsity, **kw))
  s_step, s_p, s_reg, s_upd, s_moved = sparse_steps(
      sparse.set_(opt, a.sparsity, **kw))
  if not (r_moved and s_moved):
    raise RuntimeError("the forced mask-update step moved no mask entry")

  # 3. distillation: teacher and student of the default config; the teacher
  # is an argument (not a jit constant) as it is to the teacher forward
  student = init(jax.random.key(c.seed + 1), jnp.zeros((1, seq), jnp.int32))
  teacher_fwd = jax.jit(lambda v, x: model.apply(v, x))

  @jax.jit
  def kd_step(tr, s, b, teacher):
    loss_fn = distill.distill_loss_fn(model, teacher, model,
                                      temperature=a.kd_temperature,
                                      alpha=a.kd_alpha)
    (loss, _), g = jax.value_and_grad(
        lambda t: loss_fn(t, b, None), has_aux=True)(tr)
    u, s = opt.update(g, s, tr)
    return optax.apply_updates(tr, u), s, loss

  trainable = {"student": student}
  kd_state = opt.init(trainable)
  s_state = opt.init(student)

  fns = {
      "float": lambda: float_step(variables, f_state, batch),
      "qat": lambda: qat_step(flo, q_state, batch),
      "rigl_regular": lambda: r_step(r_p, r_reg, batch),
      "rigl_update": lambda: r_step(r_p, r_upd, batch),
      "set_regular": lambda: s_step(s_p, s_reg, batch),
      "set_update": lambda: s_step(s_p, s_upd, batch),
      "teacher_forward": lambda: teacher_fwd(variables, batch[:, :-1]),
      "student_float": lambda: float_step(student, s_state, batch),
      "kd": lambda: kd_step(trainable, kd_state, batch, variables),
  }
  log(f"timing {len(fns)} steps: {a.warmup} warm-up calls each, then "
      f"{a.repeats} interleaved rounds")
  t = interleaved_medians(fns, a.warmup, a.repeats)
  amort = lambda reg, upd: (reg * (P - 1) + upd) / P
  rigl = amort(t["rigl_regular"], t["rigl_update"])
  set_ = amort(t["set_regular"], t["set_update"])
  ms = {k: v * 1e3 for k, v in t.items()}
  raw = dict(step_ms=ms, update_every=P, sparsity=a.sparsity,
             mask_entries_moved=dict(rigl=r_moved, set=s_moved),
             rigl_amortized_ms=rigl * 1e3, set_amortized_ms=set_ * 1e3)
  log(f"{'step':18s} {'ms':>9s}")
  for k, v in ms.items():
    log(f"{k:18s} {v:9.2f}")
  figs = [
      figure("qat_step_ratio", t["qat"] / t["float"],
             f"{ms['qat']:.1f} / {ms['float']:.1f} ms"),
      figure("rigl_step_ratio_amortized", rigl / t["float"],
             f"({ms['rigl_regular']:.1f} x {P - 1} + "
             f"{ms['rigl_update']:.1f}) / {P} / {ms['float']:.1f} ms"),
      figure("set_step_ratio_amortized", set_ / t["float"],
             f"({ms['set_regular']:.1f} x {P - 1} + "
             f"{ms['set_update']:.1f}) / {P} / {ms['float']:.1f} ms"),
      figure("kd_step_ratio",
             t["kd"] / (t["teacher_forward"] + t["student_float"]),
             f"{ms['kd']:.1f} / ({ms['teacher_forward']:.1f} + "
             f"{ms['student_float']:.1f}) ms"),
  ]
  return raw, figs


# ---------------------------------------------------------------- quality


def quality_part(a, c, log) -> tuple[dict, list]:
  S = a.steps
  if a.baseline_steps:
    c.train.steps = a.baseline_steps
    c.train.warmup = min(c.train.warmup, max(1, a.baseline_steps // 10))
  train_data, val_data, split = E.load_data(c)
  task = E.task(c, os.path.abspath(a.workdir), log)
  model, variables, key = task.model, task.baseline, task.key
  stats, cached = task.info["baseline_stats"], task.info["baseline_cached"]
  ctx = harness.Context(c, task, os.path.abspath(a.workdir), log)

  def ppl(tree) -> float:
    return task.evaluate(tree)["value"]

  # the same S batches, in order, for every contender
  it = stdlib_text.train_batches(train_data, c.data.seq_len,
                                 c.train.batch_size, seed=c.seed + 1000)
  batches = np.stack([next(it) for _ in range(S)])
  opt = finetune_optimizer(a.lr, S)

  def finetune(name, loss_fn, params=None, tx=opt, state=None):
    t0 = time.time()
    out = loop.train(lambda p, b, rng: loss_fn(p, b), params, tx,
                     lambda s: batches[s], steps=S, seed=c.seed,
                     log_every=max(S // 4, 1), tensorboard=False,
                     progress=lambda s: log(f"  [{name}] {s}"), state=state)
    log(f"  [{name}] {S} steps in {time.time() - t0:.1f}s")
    return out

  raw = dict(baseline_key=key, baseline_cached=cached,
             baseline_steps=stats["steps"], steps=S, lr=a.lr)
  figs = []
  t0 = time.time()
  p_float = ppl(variables)
  raw["float_ppl"] = p_float
  log(f"float baseline ppl {p_float:.4f}")
  float_loss = lambda p, b: ce(model.apply(p, b[:, :-1]), b)
  parts = set(a.quality_parts.split(","))

  if "qat" in parts:
    rtn = jax.jit(rows.make("int4_g128", c).build(ctx).apply)(variables)
    p_rtn = ppl(rtn)
    flo, rest = cj.partition_float(jax.jit(qat.from_ptq)(rtn))
    out = finetune("qat", lambda p, b: ce(
        cj.run(model, cj.combine(p, rest), b[:, :-1]), b), flo)
    exported = qat.export(cj.combine(out.params, rest))
    n_q = sum(isinstance(x, cj.QArray) for x in jax.tree.leaves(
        exported, is_leaf=cj.is_compressed))
    p_qat = ppl(exported)
    p_ft = ppl(finetune("float", float_loss, variables).params)
    gap = p_rtn - p_float
    closed = (p_rtn - p_qat) / gap if gap > 0 else float("nan")
    strict = (p_rtn - p_qat) / (p_rtn - p_ft) if p_rtn > p_ft else float(
        "nan")
    raw["qat"] = dict(rtn_ppl=p_rtn, qat_ppl=p_qat, float_finetuned_ppl=p_ft,
                      gap_closed=closed, gap_closed_vs_float_finetuned=strict,
                      exported_qarrays=n_q)
    log(f"QAT int4 g128: float {p_float:.4f}, RTN {p_rtn:.4f}, QAT "
        f"{p_qat:.4f} ({n_q} QArrays), float fine-tuned {p_ft:.4f}")
    figs.append(figure(
        "qat_gap_closed", closed,
        f"float {p_float:.3f}, RTN {p_rtn:.3f}, QAT {p_qat:.3f}; vs float "
        f"fine-tuned {S} steps ({p_ft:.3f}): {strict:.2f}"))

  if "kd" in parts:
    student = jax.jit(rows.make("nm_2_4", c).build(ctx).apply)(variables)
    flo, rest = cj.partition_float(student)
    run = lambda p, x: cj.run(model, cj.combine(p, rest), x)
    p0 = ppl(student)
    kd_fn = distill.distill_loss_fn(model, variables, student_run=run,
                                    temperature=a.kd_temperature,
                                    alpha=a.kd_alpha)
    out = finetune("kd", lambda p, b: kd_fn(p, b, None), {"student": flo})
    p_kd = ppl(cj.combine(out.params["student"], rest))
    out = finetune("ce", lambda p, b: ce(run(p, b[:, :-1]), b), flo)
    p_ce = ppl(cj.combine(out.params, rest))
    raw["kd"] = dict(student="nm_2_4 magnitude, mask fixed",
                     one_shot_ppl=p0, kd_ppl=p_kd, ce_ppl=p_ce,
                     temperature=a.kd_temperature, alpha=a.kd_alpha)
    log(f"KD 2:4 student: one-shot {p0:.4f}, KD {p_kd:.4f}, CE {p_ce:.4f}")
    figs.append(figure("kd_minus_ce_ppl", p_kd - p_ce,
                       f"KD {p_kd:.3f} vs CE {p_ce:.3f} (one-shot "
                       f"{p0:.3f}, float {p_float:.3f})"))

  if "rigl" in parts:
    every = a.rigl_every or max(1, S // 8)
    end = max(1, int(0.75 * S))
    common = dict(rules=rows.sparse_rules(ctx), seed=c.seed,
                  mask_init="magnitude")
    tx_rigl = sparse.rigl(opt, a.sparsity, end_step=end, update_every=every,
                          drop_fraction=a.rigl_drop, **common)
    # SET that never updates (update_every > S): the same hard-masked step
    # with the mask fixed
    tx_fixed = sparse.set_(opt, a.sparsity, end_step=S, update_every=S + 1,
                           **common)

    def start(tx):
      st = loop.init_state(variables, tx, seed=c.seed)
      # hard methods keep exact zeros: a loss on params gets the dense
      # gradient RigL grows by (see compressjax.train.sparse)
      return st.replace(params=sparse.masked_params(variables, st.opt_state))

    st = start(tx_rigl)
    p_oneshot = ppl(st.params)
    results = {}
    for name, tx in (("rigl", tx_rigl), ("fixed", tx_fixed)):
      out = finetune(name, float_loss, tx=tx, state=start(tx))
      sp = sparse.find_state(out.state.opt_state)
      kept = sum(int(m.sum()) for m in jax.tree.leaves(sp.masks))
      total = sum(m.size for m in jax.tree.leaves(sp.masks))
      moved = sum(int(jnp.sum(m1 != m0)) for m0, m1 in zip(
          jax.tree.leaves(st.opt_state.masks), jax.tree.leaves(sp.masks)))
      results[name] = dict(ppl=ppl(sparse.export(out.params,
                                                 out.state.opt_state)),
                           sparsity=1 - kept / total, mask_entries_moved=moved)
    p_r, p_f = results["rigl"]["ppl"], results["fixed"]["ppl"]
    raw["rigl"] = dict(one_shot_ppl=p_oneshot, dense_ppl=p_float,
                       update_every=every, end_step=end,
                       drop_fraction=a.rigl_drop, **{
                           f"{k}_{f}": v for k, r in results.items()
                           for f, v in r.items()})
    log(f"RigL {a.sparsity:.0%}: dense {p_float:.4f}, one-shot "
        f"{p_oneshot:.4f}, RigL {p_r:.4f} (moved "
        f"{results['rigl']['mask_entries_moved']}), fixed mask {p_f:.4f}")
    figs.append(figure("rigl_minus_fixed_dense_distance",
                       abs(p_r - p_float) - abs(p_f - p_float),
                       f"RigL {p_r:.3f} vs fixed {p_f:.3f}, dense "
                       f"{p_float:.3f} (one-shot {p_oneshot:.3f})"))
  raw["seconds"] = time.time() - t0
  return raw, figs


# ---------------------------------------------------------------- main


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--part", choices=("timing", "quality", "all"),
                  default="timing")
  ap.add_argument("--quality", action="store_true",
                  help="same as --part all")
  ap.add_argument("--repeats", type=int, default=20)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--update-every", type=int, default=100,
                  help="timing: the RigL/SET update period P")
  ap.add_argument("--sparsity", type=float, default=0.9)
  ap.add_argument("--steps", type=int, default=200,
                  help="quality: fine-tuning steps of every contender")
  ap.add_argument("--lr", type=float, default=3e-4)
  ap.add_argument("--kd-temperature", type=float, default=2.0)
  ap.add_argument("--kd-alpha", type=float, default=0.5)
  ap.add_argument("--rigl-every", type=int, default=0,
                  help="quality: RigL update period (0: steps // 8)")
  ap.add_argument("--rigl-drop", type=float, default=0.3)
  ap.add_argument("--quality-parts", default="qat,kd,rigl")
  ap.add_argument("--workdir", default="runs/default",
                  help="holds the cached float baseline")
  ap.add_argument("--baseline-steps", type=int, default=0,
                  help="train the baseline this many steps (a different "
                  "cache key; for smoke runs)")
  ap.add_argument("--json", default=None)
  a = ap.parse_args()
  if a.quality:
    a.part = "all"
  c = default_config.get_config()
  log = lambda s: print(s, flush=True)
  load = os.getloadavg()
  log(f"backend {jax.default_backend()}: {jax.devices()[0].device_kind}, "
      f"{os.cpu_count()} cpus, load {load[0]:.2f}; jax {jax.__version__}")
  out = dict(meta=dict(backend=jax.default_backend(),
                       device=jax.devices()[0].device_kind,
                       cpus=os.cpu_count(), loadavg_start=load,
                       python=platform.python_version(),
                       jax=jax.__version__, args=vars(a)))
  figs = []
  if a.part in ("timing", "all"):
    out["timing"], f = timing_part(a, c, log)
    figs += f
  if a.part in ("quality", "all"):
    out["quality"], f = quality_part(a, c, log)
    figs += f
  out["meta"]["loadavg_end"] = os.getloadavg()
  out["figures"] = figs
  log("")
  log(f"{'figure':34s} {'value':>9s} {'goal':>8s} {'':6s} detail")
  for r in figs:
    log(f"{r['figure']:34s} {r['value']:9.3f} {r['goal']:>8s} "
        f"{r['status']:6s} {r['detail']}")
  if a.json:
    with open(a.json, "w") as fh:
      json.dump(out, fh, indent=1)


if __name__ == "__main__":
  main()
