"""Training recipes of the experiments: QAT, distillation, dynamic sparse
training, low-rank adapters on compressed bases and the float control, each
fine-tuning a task's float baseline.

Every recipe takes a `harness.Context` (the task supplies the loss and the
batches: `Task.training`) and `config.finetune` (the optimizer and budget,
the same for every recipe), runs `compressjax.train.loop.train` in a
checkpoint directory keyed by the baseline and the settings (an interrupted
run resumes exactly; a finished one is reused), and returns the result in the
same compressed leaves post-training compression produces, with facts
(steps, final loss; None when reused).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
import optax

import compressjax as cj
from compressjax.train import adapters, distill, loop, qat, sparse
from experiments.harness import Context


def optimizer(f) -> optax.GradientTransformation:
  """Clipped adam, linear warmup then cosine to end_lr_fraction x peak."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, f.learning_rate, f.warmup, max(f.steps, f.warmup + 1),
      f.learning_rate * f.end_lr_fraction)
  return optax.chain(optax.clip_by_global_norm(f.grad_clip),
                     optax.adam(schedule))


def task_loss(ctx: Context, rest: Any = None):
  """loop.train's loss_fn: the task loss on combine(trainable, rest)."""
  loss = ctx.require("training").loss

  def loss_fn(p, batch, rng):
    del rng
    return loss(p if rest is None else cj.combine(p, rest), batch), {}

  return loss_fn


def run_dir(ctx: Context, name: str, extra: dict) -> str:
  """A checkpoint directory per recipe, baseline and settings."""
  c = ctx.config
  blob = json.dumps(dict(f=c.finetune.to_dict(), seed=c.seed, extra=extra,
                         baseline=ctx.task.key), sort_keys=True, default=str)
  key = hashlib.sha256(blob.encode()).hexdigest()[:12]
  return os.path.join(ctx.workdir, "finetune", f"{name}-{key}")


def _train(ctx: Context, name: str, extra: dict, loss_fn, params, opt
           ) -> loop.TrainResult:
  c, f = ctx.config, ctx.config.finetune
  batches = ctx.require("training").batches(f.batch_size, c.seed)
  return loop.train(
      loss_fn, params, opt, batches, steps=f.steps, seed=c.seed,
      workdir=run_dir(ctx, name, extra), checkpoint_every=f.steps, keep=1,
      log_every=f.log_every, progress=lambda s: ctx.log(f"  [{name}] {s}"))


def facts(res: loop.TrainResult) -> dict:
  losses = [h["loss"] for h in res.history if "loss" in h]
  return dict(steps=int(res.state.step),
              final_loss=losses[-1] if losses else None)


def float_recipe(ctx: Context, name: str) -> tuple[Any, dict]:
  """The control: the float model fine-tuned with the same budget, data and
  optimizer as every recipe (the baseline's cosine schedule ends at 0.1x
  its peak, so further training alone may still improve it)."""
  res = _train(ctx, name, {}, task_loss(ctx), ctx.baseline,
               optimizer(ctx.config.finetune))
  return res.params, facts(res)


def qat_recipe(ctx: Context, name: str, **qat_kw) -> tuple[Any, dict]:
  """LSQ QAT (weights; qat_kw as compressjax.train.qat.qat) initialized from
  the float model (steps from the PTQ scales), all float params trained, the
  steps in log space (`qat.relative_steps`: Adam would otherwise move them
  ~10-50x faster, relatively, than their weights); exported to QArrays."""
  tree = qat.qat(**qat_kw).apply(ctx.baseline)
  flo, rest = cj.partition_float(tree)
  opt = optax.chain(optimizer(ctx.config.finetune), qat.relative_steps())
  res = _train(ctx, name, dict(qat_kw, relative_steps=True),
               task_loss(ctx, rest), flo, opt)
  return qat.export(cj.combine(res.params, rest)), facts(res)


def adapter_recipe(ctx: Context, name: str, **lora_kw) -> tuple[Any, dict]:
  """Low-rank adapters (compressjax.train.adapters.lora; lora_kw its
  options: rank, base quantizer, init) on the float baseline, the adapters
  alone trained at config.adapters.learning_rate (the finetune schedule
  otherwise); the base stays frozen and compressed. Returns the tree with
  its LoRA leaves (base + float32 factors, not merged) and the facts."""
  c = ctx.config
  f = c.finetune.copy_and_resolve_references()
  f.learning_rate = c.adapters.learning_rate
  tree = adapters.lora(**lora_kw).apply(ctx.baseline)
  ad, rest = adapters.partition(tree)
  res = _train(ctx, name, dict(lora_kw, lr=f.learning_rate),
               task_loss(ctx, rest), ad, optimizer(f))
  return cj.combine(res.params, rest), facts(res)


def distill_recipe(ctx: Context, name: str, student: cj.Transform,
                   student_name: str) -> tuple[Any, dict]:
  """Compress with `student` (e.g. 2:4 magnitude), then recover its float
  parts (kept values, scales, norms, embeddings) by logit distillation from
  the float model; the compressed structure (the mask) stays fixed. Needs a
  causal LM task (token batches, next-token logits)."""
  f = ctx.config.finetune
  ctx.require("training")
  tree = student.apply(ctx.baseline)
  flo, rest = cj.partition_float(tree)
  loss_fn = distill.distill_loss_fn(
      ctx.model, ctx.baseline, temperature=f.temperature, alpha=f.alpha,
      student_run=lambda p, x: cj.run(ctx.model, cj.combine(p, rest), x))
  res = _train(ctx, name, dict(student=student_name), loss_fn,
               {"student": flo}, optimizer(f))
  return cj.combine(res.params["student"], rest), facts(res)


def sparse_recipe(ctx: Context, name: str, method: str, sparsity: float,
                  rules=None) -> tuple[Any, dict]:
  """Dense-to-sparse fine-tuning with a sparse optax wrapper: GMP (cubic
  schedule from dense), or RigL / SET (one-shot magnitude masks at the
  target sparsity, then drop/regrow); exported to SparseArrays."""
  c, f = ctx.config, ctx.config.finetune
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
  params = ctx.baseline
  if method != "gmp":  # start at the target sparsity
    params = jax.tree.map(np.asarray, sparse.masked_params(
        ctx.baseline, opt.init(ctx.baseline)))
  res = _train(ctx, name, dict(method=method, sparsity=sparsity,
                               rules=repr(rules), mask_init="magnitude"),
               task_loss(ctx), params, opt)
  return sparse.export(res.params, res.state.opt_state), facts(res)
