r"""Training-based compression of the default LM: QAT, distillation, dynamic
sparse training, each starting from the cached float baseline.

    python -m experiments.train_lm --config=configs/qat.py --workdir=runs/qat
    python -m experiments.train_lm --config=configs/distill.py --workdir=runs/kd
    python -m experiments.train_lm --config=configs/sparse_training.py \
        --workdir=runs/rigl --config.recipe.method=set

The float baseline is the default experiment's (trained and cached under
`<workdir>/baseline/` by `experiments.compress_lm`). Fine-tuning runs through
`compressjax.train.loop.train` (orbax checkpoints: an interrupted run resumes
exactly; a finished one is reused), then the result is exported to the same
compressed leaves PTQ produces and evaluated like every row of the default
table. The default experiment uses the same recipes for its training rows
(`qat_int4_g128`, `qat_ternary`, `kd_2_4`, `rigl_90`, `gmp_90`), so their
numbers are reproducible here with longer schedules.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax

import compressjax as cj
from compressjax.models import transformer
from compressjax.train import distill, loop, qat, sparse

Config = ml_collections.ConfigDict


def batch_fn(train_data: np.ndarray, seq_len: int, batch_size: int,
             seed: int) -> Callable[[int], np.ndarray]:
  """(B, seq_len + 1) random training windows, a pure function of the step
  (what makes a resumed run exact)."""
  n = len(train_data) - seq_len - 1
  offsets = np.arange(seq_len + 1)

  def fn(step: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 7, step])
    starts = rng.integers(0, n + 1, size=batch_size)
    return train_data[starts[:, None] + offsets].astype(np.int32)

  return fn


def optimizer(f: Config) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, f.learning_rate, f.warmup, max(f.steps, f.warmup + 1),
      f.learning_rate * f.end_lr_fraction)
  return optax.chain(optax.clip_by_global_norm(f.grad_clip),
                     optax.adam(schedule))


def lm_loss(model, rest: Any = None) -> Callable:
  """Next-byte cross entropy of the model on combine(trainable, rest)."""

  def loss_fn(p, batch, rng):
    del rng
    tree = p if rest is None else cj.combine(p, rest)
    logits = cj.run(model, tree, batch[:, :-1])
    return transformer.next_token_loss(logits, batch[:, 1:]).mean(), {}

  return loss_fn


def _run_dir(workdir: str, name: str, c: Config, extra: dict) -> str:
  """A checkpoint directory per recipe and settings: rerunning reuses it."""
  # everything that determines the baseline too, so a retrained float
  # model never resumes another one's fine-tuning
  blob = json.dumps(dict(f=c.finetune.to_dict(), seed=c.seed, extra=extra,
                         model=c.model.to_dict(), data=c.data.to_dict(),
                         train=c.train.to_dict()),
                    sort_keys=True, default=str)
  key = hashlib.sha256(blob.encode()).hexdigest()[:12]
  return os.path.join(workdir, "finetune", f"{name}-{key}")


def _train(loss_fn, params, opt, c: Config, train_data, run_dir: str,
           log: Callable[[str], None]) -> loop.TrainResult:
  f = c.finetune
  return loop.train(
      loss_fn, params, opt,
      batch_fn(train_data, c.data.seq_len, f.batch_size, c.seed),
      steps=f.steps, seed=c.seed, workdir=run_dir, checkpoint_every=f.steps,
      keep=1, log_every=f.log_every, progress=lambda s: log("  " + s))


def float_recipe(c: Config, model, baseline, train_data, workdir: str, *,
                 name: str, log=print) -> tuple[Any, dict]:
  """The control: the float model fine-tuned with the same budget, data and
  optimizer as every recipe (the baseline's cosine schedule ends at 0.1x
  its peak, so further training alone may still lower its perplexity)."""
  res = _train(lm_loss(model), baseline, optimizer(c.finetune), c,
               train_data, _run_dir(workdir, name, c, {}), log)
  return res.params, _facts(res)


def qat_recipe(c: Config, model, baseline, train_data, workdir: str, *,
               name: str, log=print, **qat_kw) -> tuple[Any, dict]:
  """LSQ QAT (weights, qat_kw like compressjax.train.qat.qat) initialized
  from the float model, all float params trained; exported to QArrays."""
  tree = qat.qat(**qat_kw).apply(baseline)
  flo, rest = cj.partition_float(tree)
  res = _train(lm_loss(model, rest), flo, optimizer(c.finetune), c,
               train_data, _run_dir(workdir, name, c, qat_kw), log)
  return qat.export(cj.combine(res.params, rest)), _facts(res)


def distill_recipe(c: Config, model, baseline, train_data, workdir: str, *,
                   name: str, student: cj.Transform, student_name: str,
                   log=print) -> tuple[Any, dict]:
  """Compress with `student` (e.g. 2:4 magnitude), then recover its float
  parts (kept values, scales, norms, embeddings) by logit distillation from
  the float model; the compressed structure (the mask) stays fixed."""
  f = c.finetune
  tree = student.apply(baseline)
  flo, rest = cj.partition_float(tree)
  loss_fn = distill.distill_loss_fn(
      model, baseline, temperature=f.temperature, alpha=f.alpha,
      student_run=lambda p, x: cj.run(model, cj.combine(p, rest), x))
  res = _train(loss_fn, {"student": flo}, optimizer(f), c, train_data,
               _run_dir(workdir, name, c, dict(student=student_name)), log)
  return cj.combine(res.params["student"], rest), _facts(res)


def sparse_recipe(c: Config, model, baseline, train_data, workdir: str, *,
                  name: str, method: str, sparsity: float, rules=None,
                  log=print) -> tuple[Any, dict]:
  """Dense-to-sparse fine-tuning with a sparse optax wrapper: GMP (cubic
  schedule from dense), or RigL / SET (one-shot magnitude masks at the
  target sparsity, then drop/regrow); exported to SparseArrays."""
  f = c.finetune
  end = max(int(f.steps * f.end_fraction), 1)
  inner = optimizer(f)
  common = dict(distribution=f.distribution, rules=rules)
  if method == "gmp":
    opt = sparse.gmp(inner, sparsity, end_step=end,
                     update_every=f.prune_every, **common)
  elif method in ("rigl", "set"):
    make = sparse.rigl if method == "rigl" else sparse.set_
    # start from the trained model's largest weights, not random masks
    opt = make(inner, sparsity, end_step=end, update_every=f.update_every,
               drop_fraction=f.drop_fraction, seed=c.seed,
               mask_init="magnitude", **common)
  else:
    raise ValueError(f"unknown sparse method {method!r}: gmp, rigl or set")
  params = baseline
  if method != "gmp":  # start at the target sparsity
    params = jax.tree.map(np.asarray, sparse.masked_params(
        baseline, opt.init(baseline)))
  res = _train(lm_loss(model), params, opt, c, train_data,
               _run_dir(workdir, name, c, dict(method=method,
                                                sparsity=sparsity,
                                                rules=repr(rules),
                                                mask_init="magnitude")), log)
  return sparse.export(res.params, res.state.opt_state), _facts(res)


def _facts(res: loop.TrainResult) -> dict:
  losses = [h["loss"] for h in res.history if "loss" in h]
  return dict(steps=int(res.state.step),
              final_loss=losses[-1] if losses else None)


# ---------------------------------------------------------------------------
# Entry point: one recipe with its own config
# ---------------------------------------------------------------------------

def run(c: Config, workdir: str, log=print) -> dict:
  from experiments import compress_lm  # the shared baseline and evaluation

  r = c.recipe
  workdir = os.path.abspath(workdir)
  train_data, val_data, split = compress_lm.load_data(c)
  model = compress_lm.build_model(c)
  key = compress_lm.baseline_key(c, split.digest)
  baseline, _, _ = compress_lm.get_baseline(c, model, train_data, key,
                                            workdir, log)
  name = r.method
  t0 = time.time()
  if r.method == "qat":
    tree, facts = qat_recipe(c, model, baseline, train_data, workdir,
                             name=name, log=log,
                             bits=None if r.format else r.bits,  # one of
                             format=r.format or None,
                             group_size=r.group_size or None,
                             rules=compress_lm._head_rules(c))
  elif r.method == "distill":
    tree, facts = distill_recipe(
        c, model, baseline, train_data, workdir, name=name, log=log,
        student=compress_lm.METHODS[r.student](c), student_name=r.student)
  else:
    tree, facts = sparse_recipe(c, model, baseline, train_data, workdir,
                                name=name, method=r.method,
                                sparsity=r.sparsity, log=log,
                                rules=compress_lm._sparse_rules(c))
  seconds = time.time() - t0
  eval_step = compress_lm.make_eval_step(model)
  rows = []
  for label, t in (("float32", baseline), (name, tree)):
    loss, n = compress_lm.evaluate(eval_step, t, c, val_data)
    rows.append(dict(method=label, value=math.exp(loss), val_loss=loss,
                     eval_bytes=n, **compress_lm.measure(baseline, t)))
    log(f"{label:10s} val ppl {rows[-1]['value']:.3f}  bits/w "
        f"{rows[-1]['bits_per_weight']:.3f}")
  rows[-1].update(seconds=round(seconds, 1), **facts)
  with open(os.path.join(workdir, "results.json"), "w") as fh:
    json.dump(rows, fh, indent=2)
  cj.save(os.path.join(workdir, "compressed"), tree, force=True)
  return dict(rows=rows)


def define_flags() -> None:
  config_flags.DEFINE_config_file(
      "config", None, "A recipe config: configs/qat.py, configs/distill.py "
      "or configs/sparse_training.py.", lock_config=True)
  flags.DEFINE_string("workdir", "runs/train_lm", "Output directory.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  f = flags.FLAGS
  if f.config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/qat.py")
  if not f["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  run(f.config, f.workdir)


if __name__ == "__main__":
  define_flags()
  app.run(main)
