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

Adapters and reconstruction (issue 14):
  7. Cost (--part adapters): one training step of rank-8 LoRA adapters on an
     int4 g128 base and on an NF4 (double-quantized) base, through
     `compressjax.run`, adapters alone trained (adam), vs full fine-tuning of
     the float model (same optimizer): XLA's peak memory of the compiled,
     state-donating step (buffer assignment: arguments + outputs + temps -
     aliases; `memory_analysis().peak_memory_in_bytes`), the bytes of the
     trained tree (= gradient bytes), and the step time (interleaved
     medians). Goal: adapter step on int4 peaks below full fine-tuning.
  8. Quality (--quality-parts adapters): from the baseline, rank-8 adapters
     (alpha 16) on every kernel, --steps of the experiment's fine-tuning
     recipe (recipes.optimizer: adam, warmup + cosine, lr --adapter-lr;
     --steps 0: starts only): float LoRA vs
     QLoRA (NF4 blocks of 64, double quantization; head int8 per channel).
     Goal: QLoRA within 2% of float LoRA. LoftQ (5 alternations) vs B = 0 on
     int2 g64 and int3 g128 bases: perplexity before any training (goal:
     LoftQ lower) and after --steps.
  9. Quality (--quality-parts reconstruct): the experiment's rows
     (`train.reconstruct` per layer from one-shot calibration, the
     experiment's calibration windows), --recon-iters per phase, head int8
     per channel: int3 g128 AdaRound and
     LWC + AdaRound vs GPTQ int3 g128 (goal: lower; with --recon-seeds N,
     GPTQ and LWC + AdaRound on N calibration draws, paired: lower by more
     than 2 standard errors); int2 g64 vs RTN int2
     g64 (goal: at most half of RTN's perplexity; unreachable once RTN is
     below twice the float perplexity, so also: the gap to float at most
     half of RTN's gap).
  10. QAT comparison (--quality-parts qat_compare): int4 g128 from the float
     model with the experiment's recipe (recipes.optimizer, config.finetune), for
     --qat-seeds batch seeds: LSQ as published (init 2 mean|v|/sqrt(Q_P),
     plain optimizer), STE with the fixed PTQ step, qwix's QAT recipe
     (reproduced from its source: absmax scale recomputed from the current
     weight every step, identity straight-through, RTN at export) and the
     default (PTQ init + qat.relative_steps). Goal: the default's mean
     perplexity at most the best other mean. Seed-to-seed spread (~0.02) is
     larger than the recipes' differences, so also: the default minus each
     other recipe paired by seed, mean and standard error; goal: no other
     recipe better by more than 2 standard errors (z <= 2).

  python bench/training.py [--part timing|quality|adapters|all] [--repeats 20]
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
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import compressjax as cj
from compressjax.data import stdlib_text
from compressjax.models import transformer
from compressjax.core.tree import leaves_with_paths, map_with_paths
from compressjax.quantization.rtn import quantize_array
from compressjax.train import (adapters, distill, loop, qat, reconstruct,
                               sparse)
from configs import default as default_config
from experiments import harness
from timing import interleaved_medians
from experiments import lm_task as E
from experiments import recipes, rows

GOALS = {
    "qat_step_ratio": ("<=", 1.25),
    "rigl_step_ratio_amortized": ("<=", 1.05),
    "set_step_ratio_amortized": ("<=", 1.05),
    "kd_step_ratio": ("<=", 1.10),
    "qat_gap_closed": (">=", 0.5),
    "kd_minus_ce_ppl": ("<", 0.0),
    "rigl_minus_fixed_dense_distance": ("<", 0.0),
    "adapter_int4_over_full_ft_peak_memory": ("<", 1.0),
    "qlora_over_float_lora_ppl": ("<=", 1.02),
    "loftq_minus_standard_start_ppl_int2": ("<", 0.0),
    "loftq_minus_standard_start_ppl_int3": ("<", 0.0),
    "adaround_int3_minus_gptq_int3_ppl": ("<", 0.0),
    "lwc_adaround_int3_minus_gptq_int3_paired_z": ("<", -2.0),
    "recon_int2_over_rtn_int2_ppl": ("<=", 0.5),
    "recon_int2_gap_over_rtn_int2_gap": ("<=", 0.5),
    "qat_default_minus_best_other_mean_ppl": ("<=", 0.0),
    "qat_default_minus_best_other_paired_z": ("<=", 2.0),
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


def figure(name: str, value: float, detail: str = "") -> dict:
  op, target = GOALS[name]
  ok = {"<=": value <= target, ">=": value >= target,
        "<": value < target}[op] if math.isfinite(value) else False
  return dict(figure=name, value=value, goal=f"{op} {target:g}",
              status="PASS" if ok else "FAIL", detail=detail)


# ---------------------------------------------------------------- timing


def _model_and_batch(c):
  """The config's model and one training batch of its data."""
  model = E.build_model(c)
  train_data, _ = stdlib_text.load(max_bytes=c.data.max_bytes,
                                   max_val_bytes=c.data.max_val_bytes,
                                   val_files=c.data.val_files)
  batch = jnp.asarray(next(stdlib_text.train_batches(
      train_data, c.data.seq_len, c.train.batch_size, seed=c.seed)))
  return model, batch


def timing_part(a, c, log) -> tuple[dict, list]:
  model, batch = _model_and_batch(c)
  init = jax.jit(model.init)
  variables = init(jax.random.key(c.seed), jnp.zeros((1, c.data.seq_len), jnp.int32))
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
  student = init(jax.random.key(c.seed + 1), jnp.zeros((1, c.data.seq_len), jnp.int32))
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
  t = interleaved_medians(fns, warmup=a.warmup, repeats=a.repeats)
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


# ---------------------------------------------------------------- adapters


def _peak_bytes(fn, *args, donate=()) -> int:
  """XLA's peak memory of jit(fn) on these arguments (buffer assignment)."""
  c = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
  return int(c.memory_analysis().peak_memory_in_bytes)


def _nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


HEAD_8 = [(r"params/head/kernel", dict(bits=8, format=None, group_size=None,
                                       double_quant=False))]


def adapters_part(a, c, log) -> tuple[dict, list]:
  model, batch = _model_and_batch(c)
  variables = jax.jit(model.init)(jax.random.key(c.seed),
                                  jnp.zeros((1, c.data.seq_len), jnp.int32))
  opt = finetune_optimizer(a.lr, 1000)

  def full_step(p, s, b):
    loss, g = jax.value_and_grad(
        lambda p: ce(model.apply(p, b[:, :-1]), b))(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  def adapter_step(p, s, rest, b):
    loss, g = jax.value_and_grad(lambda p: ce(
        cj.run(model, cj.combine(p, rest), b[:, :-1]), b))(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  bases = {
      "int4_g128": dict(bits=4, group_size=128),
      "nf4_dq": dict(format="nf4", group_size=64, double_quant=True),
      "float": {},
  }
  runs = {"full_ft": (full_step, (variables, opt.init(variables), batch))}
  trained_bytes = {"full_ft": _nbytes(variables)}
  for name, kw in bases.items():
    tree = jax.jit(adapters.lora(a.rank, rules=HEAD_8 if kw else [],
                                 **kw).apply)(variables)
    ad, rest = adapters.partition(tree)
    runs[f"lora_{name}"] = (adapter_step, (ad, opt.init(ad), rest, batch))
    trained_bytes[f"lora_{name}"] = _nbytes(ad)
  peak = {k: _peak_bytes(f, *args, donate=(0, 1))
          for k, (f, args) in runs.items()}
  jitted = {k: jax.jit(f) for k, (f, _) in runs.items()}
  fns = {k: (lambda k=k: jitted[k](*runs[k][1])) for k in runs}
  log(f"timing {len(fns)} steps: {a.warmup} warm-up calls each, then "
      f"{a.repeats} interleaved rounds")
  t = interleaved_medians(fns, warmup=a.warmup, repeats=a.repeats)
  log(f"{'step':18s} {'ms':>9s} {'peak MiB':>9s} {'trained KiB':>12s}")
  for k in runs:
    log(f"{k:18s} {t[k] * 1e3:9.2f} {peak[k] / 2**20:9.2f} "
        f"{trained_bytes[k] / 1024:12.1f}")
  raw = dict(rank=a.rank, step_ms={k: v * 1e3 for k, v in t.items()},
             peak_bytes=peak, trained_bytes=trained_bytes,
             step_ratio_vs_full={k: t[k] / t["full_ft"] for k in t})
  figs = [figure("adapter_int4_over_full_ft_peak_memory",
                 peak["lora_int4_g128"] / peak["full_ft"],
                 f"{peak['lora_int4_g128'] / 2**20:.2f} / "
                 f"{peak['full_ft'] / 2**20:.2f} MiB; NF4 "
                 f"{peak['lora_nf4_dq'] / 2**20:.2f}, float LoRA "
                 f"{peak['lora_float'] / 2**20:.2f}; step "
                 f"{t['lora_int4_g128'] * 1e3:.1f} vs "
                 f"{t['full_ft'] * 1e3:.1f} ms")]
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
  batches = np.stack([next(it) for _ in range(S)]) if S else None
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
  if "adapters" in parts:
    raw["adapters"], f = _adapter_quality(a, ctx, ppl, log)
    figs += f
  if "reconstruct" in parts:
    raw["reconstruct"], f = _reconstruct_quality(a, ctx, ppl, log)
    figs += f
  if "qat_compare" in parts:
    raw["qat_compare"], f = _qat_compare(a, ctx, ppl, log)
    figs += f
  raw["seconds"] = time.time() - t0
  return raw, figs


def _recipe(c, steps: int, lr: float):
  """The experiment's fine-tuning recipe (recipes.optimizer) at `steps`,
  `lr`."""
  f = c.finetune.copy_and_resolve_references()
  f.steps, f.learning_rate = steps, lr
  return f


def _adapter_quality(a, ctx, ppl, log):
  c = ctx.config
  f = _recipe(c, a.steps, a.adapter_lr)
  cfgs = {
      "float_lora": {},
      "qlora_nf4": dict(format="nf4", group_size=64, double_quant=True),
      "standard_int2_g64": dict(bits=2, group_size=64),
      "loftq_int2_g64": dict(bits=2, group_size=64, init="loftq"),
      "standard_int3_g128": dict(bits=3, group_size=128),
      "loftq_int3_g128": dict(bits=3, group_size=128, init="loftq"),
  }
  out = {}
  for name, kw in cfgs.items():
    t0 = time.time()
    tree = jax.jit(adapters.lora(a.rank, rules=HEAD_8 if kw else [],
                                 **kw).apply)(ctx.baseline)
    start = ppl(tree)
    ad, rest = adapters.partition(tree)
    end = start
    if f.steps:
      res = loop.train(recipes.task_loss(ctx, rest), ad, recipes.optimizer(f),
                       ctx.task.training.batches(f.batch_size, c.seed),
                       steps=f.steps, seed=c.seed,
                       log_every=max(f.steps // 2, 1), tensorboard=False,
                       progress=lambda s: log(f"  [{name}] {s}"))
      end = ppl(cj.combine(res.params, rest))
    out[name] = dict(start_ppl=start, end_ppl=end,
                     seconds=time.time() - t0)
    log(f"{name:20s} start {start:.4f}  after {f.steps} steps {end:.4f}")
  ratio = out["qlora_nf4"]["end_ppl"] / out["float_lora"]["end_ppl"]
  figs = [figure("qlora_over_float_lora_ppl", ratio,
                 f"QLoRA {out['qlora_nf4']['end_ppl']:.4f} vs float LoRA "
                 f"{out['float_lora']['end_ppl']:.4f} (rank {a.rank}, "
                 f"{f.steps} steps)")]
  for bits, g in ((2, 64), (3, 128)):
    lq, st = out[f"loftq_int{bits}_g{g}"], out[f"standard_int{bits}_g{g}"]
    figs.append(figure(
        f"loftq_minus_standard_start_ppl_int{bits}",
        lq["start_ppl"] - st["start_ppl"],
        f"start {lq['start_ppl']:.3f} vs {st['start_ppl']:.3f}; after "
        f"{f.steps} steps {lq['end_ppl']:.3f} vs {st['end_ppl']:.3f}"))
  return dict(rank=a.rank, lr=a.adapter_lr, steps=f.steps, runs=out), figs


def _reconstruct_quality(a, ctx, ppl, log):
  """The experiment's rows (experiments.rows) at --recon-iters."""
  c = ctx.config
  c.reconstruct.iters = a.recon_iters
  out = {}
  for name in ("int3_g128", "gptq_int3_g128", "adaround_int3_g128",
               "lwc_adaround_int3_g128", "int2_g64", "lwc_adaround_int2_g64"):
    ctx.stats  # computed once, outside the rows' clocks
    t0 = time.time()
    tree = jax.block_until_ready(rows.make(name, c).compress(ctx))
    sec = time.time() - t0
    out[name] = dict(ppl=ppl(tree), seconds=sec)
    log(f"{name:24s} {out[name]['ppl']:.4f} ({sec:.0f}s)")
  fl = ppl(ctx.baseline)
  best3 = min(out["adaround_int3_g128"]["ppl"],
              out["lwc_adaround_int3_g128"]["ppl"])
  figs = [
      figure("adaround_int3_minus_gptq_int3_ppl",
             best3 - out["gptq_int3_g128"]["ppl"],
             f"AdaRound {out['adaround_int3_g128']['ppl']:.3f}, LWC+AdaRound "
             f"{out['lwc_adaround_int3_g128']['ppl']:.3f} vs GPTQ "
             f"{out['gptq_int3_g128']['ppl']:.3f} (RTN "
             f"{out['int3_g128']['ppl']:.3f})"),
      figure("recon_int2_over_rtn_int2_ppl",
             out["lwc_adaround_int2_g64"]["ppl"] / out["int2_g64"]["ppl"],
             f"{out['lwc_adaround_int2_g64']['ppl']:.3f} vs RTN "
             f"{out['int2_g64']['ppl']:.3f}"),
      # the ratio above cannot reach 0.5 once RTN is below twice the float
      # perplexity; the gap to float can
      figure("recon_int2_gap_over_rtn_int2_gap",
             (out["lwc_adaround_int2_g64"]["ppl"] - fl) /
             (out["int2_g64"]["ppl"] - fl),
             f"{out['lwc_adaround_int2_g64']['ppl']:.3f} and RTN "
             f"{out['int2_g64']['ppl']:.3f} over float {fl:.3f}"),
  ]
  paired = None
  if a.recon_seeds > 1:
    # GPTQ vs LWC + AdaRound int3 over calibration draws (seeds c.calib.seed
    # + i, the first being the run above), paired by draw
    per = {k: [out[k]["ppl"]] for k in ("gptq_int3_g128",
                                        "lwc_adaround_int3_g128")}
    seed0 = c.calib.seed
    try:
      for i in range(1, a.recon_seeds):
        c.calib.seed = seed0 + i
        cx = harness.Context(c, ctx.task, ctx.workdir, ctx.log)
        for k in per:
          per[k].append(ppl(rows.make(k, c).compress(cx)))
        log(f"calibration seed {c.calib.seed}: " + ", ".join(
            f"{k} {v[-1]:.4f}" for k, v in per.items()))
    finally:
      c.calib.seed = seed0
    d = (np.asarray(per["lwc_adaround_int3_g128"]) -
         np.asarray(per["gptq_int3_g128"]))
    se = float(d.std(ddof=1) / np.sqrt(len(d)))
    paired = dict(runs=per, mean_diff=float(d.mean()), std_err=se)
    figs.append(figure(
        "lwc_adaround_int3_minus_gptq_int3_paired_z", float(d.mean()) / se,
        f"{d.mean():+.4f} +- {se:.4f} over {len(d)} calibration draws "
        f"(means {np.mean(per['lwc_adaround_int3_g128']):.4f} vs "
        f"{np.mean(per['gptq_int3_g128']):.4f})"))
  return dict(iters=a.recon_iters, rows=out, calib_seeds=paired), figs


def _qwix_like_tree(ctx, f, seed):
  """qwix's QAT recipe (read from its source: dot_general_qt): the weight's
  absmax scale recomputed from the current float weight every forward (no
  gradient), round-to-nearest with an identity straight-through gradient;
  exported by the int4_g128 row (RTN) of the trained weights."""
  c, model, variables = ctx.config, ctx.model, ctx.baseline
  quant = rows.make("int4_g128", c).build(ctx)
  # per quantized path: format, contraction axes and group size of the row
  how = {}
  for path, qa in leaves_with_paths(jax.eval_shape(quant.apply, variables)):
    if isinstance(qa, cj.QArray):
      how[path] = (qa.fmt, qa.contract,
                   None if qa.groups == 1 else qa.group_size)

  def fq(path, w):
    if path not in how:
      return w
    fmt, axis, group = how[path]
    s = quantize_array(jax.lax.stop_gradient(w), format=fmt,
                       group_size=group, axis=axis).scale_values()
    return qat.fake_quant(w, s, fmt, axis=axis)

  def loss_fn(p, batch, rng):
    del rng
    tree = map_with_paths(fq, p)
    logits = model.apply(tree, batch[:, :-1])
    return transformer.next_token_loss(logits, batch[:, 1:]).mean(), {}

  res = loop.train(loss_fn, variables, recipes.optimizer(f),
                   ctx.task.training.batches(f.batch_size, seed),
                   steps=f.steps, seed=c.seed, log_every=None,
                   tensorboard=False, progress=False)
  return quant.apply(res.params)


def _qat_compare(a, ctx, ppl, log):
  c = ctx.config
  f = _recipe(c, a.steps, c.finetune.learning_rate)
  q = dict(bits=4, group_size=128, rules=rows.head_rules(ctx, 4))
  variants = {  # (qat options, steps in log space)
      "lsq_paper": (dict(q, step_init="lsq"), False),
      "ste_fixed_ptq": (dict(q, weight="ste"), False),
      "default": (q, True),
  }
  runs: dict = {k: [] for k in [*variants, "qwix_like"]}
  for i in range(a.qat_seeds):
    seed = c.seed + i
    for name, (kw, rel) in variants.items():
      tree = qat.qat(**kw).apply(ctx.baseline)
      flo, rest = cj.partition_float(tree)
      opt = recipes.optimizer(f)
      if rel:
        opt = optax.chain(opt, qat.relative_steps())
      res = loop.train(recipes.task_loss(ctx, rest), flo, opt,
                       ctx.task.training.batches(f.batch_size, seed),
                       steps=f.steps, seed=c.seed, log_every=None,
                       tensorboard=False, progress=False)
      runs[name].append(ppl(qat.export(cj.combine(res.params, rest))))
    runs["qwix_like"].append(ppl(_qwix_like_tree(ctx, f, seed)))
    log(f"seed {seed}: " + ", ".join(f"{k} {v[-1]:.4f}"
                                     for k, v in runs.items()))
  means = {k: float(np.mean(v)) for k, v in runs.items()}
  # paired by batch seed: default - other per seed, its mean and standard
  # error (seed-to-seed spread is larger than the recipes' differences)
  paired = {}
  for k, v in runs.items():
    if k != "default":
      d = np.asarray(runs["default"]) - np.asarray(v)
      se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else math.nan
      paired[k] = dict(mean_diff=float(d.mean()), std_err=se)
      log(f"default - {k}: {d.mean():+.4f} +- {se:.4f} (paired, "
          f"{len(d)} seeds)")
  best_other = min(v for k, v in means.items() if k != "default")
  best = min(paired, key=lambda k: means[k])
  figs = [figure("qat_default_minus_best_other_mean_ppl",
                 means["default"] - best_other,
                 ", ".join(f"{k} {v:.4f}" for k, v in means.items()) +
                 f" (means over {a.qat_seeds} batch seeds; paired default - "
                 f"{best} {paired[best]['mean_diff']:+.4f} +- "
                 f"{paired[best]['std_err']:.4f} s.e.)")]
  if a.qat_seeds > 1:
    # the default worse than the best other by more than noise: z > 2
    worst = max(paired, key=lambda k: paired[k]["mean_diff"] /
                paired[k]["std_err"])
    z = paired[worst]["mean_diff"] / paired[worst]["std_err"]
    figs.append(figure(
        "qat_default_minus_best_other_paired_z", z,
        f"default - {worst} {paired[worst]['mean_diff']:+.4f} +- "
        f"{paired[worst]['std_err']:.4f} (paired over {a.qat_seeds} seeds)"))
  return dict(steps=f.steps, runs=runs, means=means, paired=paired), figs


# ---------------------------------------------------------------- main


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--part", choices=("timing", "quality", "adapters", "all"),
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
  ap.add_argument("--quality-parts", default="qat,kd,rigl",
                  help="any of qat,kd,rigl,adapters,reconstruct,qat_compare")
  ap.add_argument("--rank", type=int, default=8, help="adapter rank")
  ap.add_argument("--adapter-lr", type=float, default=1e-3)
  ap.add_argument("--recon-iters", type=int, default=2000)
  ap.add_argument("--recon-seeds", type=int, default=1,
                  help="reconstruct: calibration draws for the paired "
                  "GPTQ vs LWC + AdaRound int3 comparison")
  ap.add_argument("--qat-seeds", type=int, default=3)
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
  if a.part in ("adapters", "all"):
    out["adapters"], f = adapters_part(a, c, log)
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
