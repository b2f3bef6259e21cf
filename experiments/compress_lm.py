r"""The default experiment: compress a byte-level LM; measure size, perplexity.

1. Train a small float transformer LM on the Python standard library's source
   bytes (cached in the workdir, keyed by a hash of the data, model and train
   configs, so reruns and runs that change only compression settings skip it).
2. For every row named in `config.methods`, build a transform from `METHODS`,
   compress the baseline, and evaluate validation perplexity by running the
   unmodified model on the compressed tree (`compressjax.run` under jit).
3. Write results.json, results.md, results.png, per-layer summaries and a
   checkpoint of every compressed tree into the workdir.

    python -m experiments.compress_lm --workdir=/tmp/cj_default
    python -m experiments.compress_lm --workdir=/tmp/cj_default \
        --config.quant.bits=3 --config.methods=float32,int4_g128

Adding a row is one entry in `METHODS`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import ml_collections
import numpy as np
import optax

import compressjax as cj
from compressjax.calibrate import capture, sequential
from compressjax.quantization.awq import awq
from compressjax.quantization.gptq import gptq
from compressjax.quantization.rotation import quarot, rotation_gptq
from compressjax.quantization.smoothquant import smoothquant
from compressjax.core.rules import default_filter
from compressjax.core.tree import leaves_with_paths
from compressjax.data import stdlib_text
from compressjax.models import transformer
from experiments import train_lm

Config = ml_collections.ConfigDict

# Resolved against this file, so the default works from any directory.
_DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
    "default.py")

# Bump when the model or training code changes in a way the config does not
# show, so stale cached baselines are not reused.
CACHE_VERSION = 1

METRIC = "val_ppl"


# ---------------------------------------------------------------------------
# Method registry
# ---------------------------------------------------------------------------

def method(build: Callable[..., cj.Transform], description: str,
           calibrated: bool = False, sequential: bool = False,
           with_model: bool = False, trained: bool = False
           ) -> Callable[..., cj.Transform]:
  """Tags a transform builder with a description (formatted with c=config).

  A calibrated builder is called as build(c, stats) with the per-layer
  calibration statistics (compressjax.calibrate.capture on training windows,
  computed once per run: one-shot); with sequential=True the same builder is
  run block by block by compressjax.calibrate.sequential, each block
  calibrated on the outputs of the compressed blocks before it. Others are
  called as build(c). with_model=True builders are called as
  build(c, stats, model, batches) (e.g. rotate, recalibrate, then GPTQ).
  trained=True builders are training recipes (experiments/train_lm.py),
  called as build(c, model, baseline, train_data, workdir, log) -> tree.
  """
  build.trained = trained
  build.description = description
  build.calibrated = calibrated or sequential or with_model
  build.sequential = sequential
  build.with_model = with_model
  return build


def _head_rules(c: Config) -> list:
  """Low-bit rows keep the output head at 8 bits, per output channel (first
  and last layers at 8 bits is common practice; the embedding is not
  compressed at all, the default filter excludes it)."""
  if not c.quant.head_bits:
    return []
  return [(r"params/head/kernel", dict(bits=c.quant.head_bits, format=None,
                                       group_size=None))]


def _sparse_rules(c: Config) -> list:
  """Sparsity rows leave the head dense unless config.sparsity.prune_head.

  As in SparseGPT and Wanda, which prune only the blocks' linear layers. Here
  it matters a lot: the head columns of bytes that never occur carry large
  weights, so one per-layer magnitude threshold strips the columns of common
  bytes almost bare (val ppl ~5.5 -> ~34 with 50% unstructured).
  """
  return [] if c.sparsity.prune_head else [(r"params/head/kernel", None)]


def _nm_group(c: Config) -> int | None:
  """Group size over the kept N:M values covering `group_size` dense inputs.

  2:4 halves the kept axis (128 -> 64), so a group of 128 no longer divides
  it; n/m of it does. Falls back to per-channel scales when that is not whole.
  """
  g = c.quant.group_size
  if g is None or (g * c.sparsity.n) % c.sparsity.m:
    return None
  return g * c.sparsity.n // c.sparsity.m


def _notes(c: Config) -> dict:
  """Description fragments shared by the rows' format strings."""
  g = _nm_group(c)
  head_q = f"int{c.quant.head_bits} per channel" if c.quant.head_bits else ""
  unpruned = "" if c.sparsity.prune_head else "not pruned"
  both = ", ".join(x for x in (unpruned, head_q) if x)
  return dict(head=f"; head {head_q}" if head_q else "",
              sparse_head=f"; head {unpruned}" if unpruned else "",
              sparse_quant_head=f"; head {both}" if both else "",
              nm_group="per channel" if g is None else g)


def _model_cfg(c: Config) -> transformer.TransformerConfig:
  return transformer.TransformerConfig.from_dict(c.model.to_dict())


T = cj.transforms
# name -> builder(config) -> Transform. Rows appear in the order of
# config.methods. Descriptions are format strings over `c` (the config).
METHODS: dict[str, Callable[[Config], cj.Transform]] = {
    "float32": method(
        lambda c: cj.chain(), "float32 baseline, nothing compressed"),
    "int8": method(
        lambda c: T.quantize(8),
        "int8 RTN, symmetric, per output channel"),
    "int4_g128": method(
        lambda c: T.quantize(c.quant.bits, group_size=c.quant.group_size,
                             rules=_head_rules(c)),
        "int{c.quant.bits} RTN, symmetric, groups of {c.quant.group_size} "
        "inputs{head}"),
    "unstructured_50": method(
        lambda c: T.sparsify(c.sparsity.fraction, rules=_sparse_rules(c)),
        "magnitude pruning, {c.sparsity.fraction:.0%} unstructured per "
        "layer{sparse_head}"),
    "nm_2_4": method(
        lambda c: T.sparsify(pattern="nm", n=c.sparsity.n, m=c.sparsity.m,
                             rules=_sparse_rules(c)),
        "magnitude {c.sparsity.n}:{c.sparsity.m} along inputs{sparse_head}"),
    "lowrank": method(
        lambda c: T.low_rank(rank_ratio=c.lowrank.rank_ratio),
        "truncated SVD, rank ratio {c.lowrank.rank_ratio} of each kernel's "
        "parameters"),
    "nm_2_4+int4": method(
        lambda c: cj.chain(
            T.sparsify(pattern="nm", n=c.sparsity.n, m=c.sparsity.m,
                       rules=_sparse_rules(c)),
            T.quantize(c.quant.bits, group_size=_nm_group(c),
                       rules=_head_rules(c))),
        "{c.sparsity.n}:{c.sparsity.m} then int{c.quant.bits} RTN of the kept "
        "values, groups of {nm_group}{sparse_quant_head}"),
    # Number formats (compressjax.formats): same head rule as the int4 row.
    "int3_g128": method(
        lambda c: T.quantize(3, group_size=c.quant.group_size,
                             rules=_head_rules(c)),
        "int3 RTN, symmetric, groups of {c.quant.group_size} inputs{head}"),
    "int2_g64": method(
        lambda c: T.quantize(2, group_size=c.quant.small_group_size,
                             rules=_head_rules(c)),
        "int2 RTN, symmetric, groups of {c.quant.small_group_size} "
        "inputs{head}"),
    "ternary": method(
        lambda c: T.quantize(format="ternary", rules=_head_rules(c)),
        "ternary {{-1,0,1}} x per-channel scale (TWN threshold), 2-bit "
        "codes{head}"),
    "nf4": method(
        lambda c: T.quantize(format="nf4", group_size=c.quant.small_group_size,
                             rules=_head_rules(c)),
        "NF4 (QLoRA levels), absmax blocks of {c.quant.small_group_size}"
        "{head}"),
    "fp8_e4m3": method(
        lambda c: T.quantize(format="fp8_e4m3"),
        "fp8 e4m3fn elements, float32 scale per output channel"),
    "mxfp4": method(
        lambda c: T.quantize(format="mxfp4", rules=_head_rules(c)),
        "OCP MXFP4: e2m1 elements, E8M0 scale per 32 inputs{head}"),
    "nvfp4": method(
        lambda c: T.quantize(format="nvfp4", rules=_head_rules(c)),
        "NVFP4: e2m1 elements, e4m3 scale per 16 inputs, f32 tensor "
        "scale{head}"),
    # Calibrated algorithms (one-shot: every layer sees the float model's
    # activations on config.calib.batches training windows).
    "gptq_int4_g128": method(
        lambda c, stats: gptq(stats, c.quant.bits,
                              group_size=c.quant.group_size,
                              rules=_head_rules(c)),
        "GPTQ int{c.quant.bits}, groups of {c.quant.group_size}, one-shot "
        "calibration{head}", calibrated=True),
    "gptq_int3_g128": method(
        lambda c, stats: gptq(stats, 3, group_size=c.quant.group_size,
                              rules=_head_rules(c)),
        "GPTQ int3, groups of {c.quant.group_size}, one-shot "
        "calibration{head}", calibrated=True),
    "gptq_int3_g128_seq": method(
        lambda c, stats: gptq(stats, 3, group_size=c.quant.group_size,
                              rules=_head_rules(c)),
        "GPTQ int3, groups of {c.quant.group_size}, sequential: each block "
        "calibrated on the compressed blocks before it{head}",
        sequential=True),
    "sparsegpt_50": method(
        lambda c, stats: T.sparsegpt(stats, c.sparsity.fraction,
                                     rules=_sparse_rules(c)),
        "SparseGPT {c.sparsity.fraction:.0%} unstructured (OBS update, mask "
        "per 128 columns), one-shot{sparse_head}", calibrated=True),
    "sparsegpt_2_4": method(
        lambda c, stats: T.sparsegpt(stats, pattern="nm", n=c.sparsity.n,
                                     m=c.sparsity.m, rules=_sparse_rules(c)),
        "SparseGPT {c.sparsity.n}:{c.sparsity.m}, one-shot{sparse_head}",
        calibrated=True),
    "sparsegpt_2_4+int4": method(
        lambda c, stats: T.sparsegpt(
            stats, pattern="nm", n=c.sparsity.n, m=c.sparsity.m,
            bits=c.quant.bits, group_size=_nm_group(c),
            rules=_sparse_rules(c)),
        "SparseGPT {c.sparsity.n}:{c.sparsity.m} with joint int{c.quant.bits} "
        "quantization in the same pass, groups of {nm_group} kept "
        "values{sparse_head}", calibrated=True),
    "wanda_50": method(
        lambda c, stats: T.wanda(stats, c.sparsity.fraction,
                                 rules=_sparse_rules(c)),
        "Wanda {c.sparsity.fraction:.0%} unstructured, |W|*||X|| per output, "
        "no update{sparse_head}", calibrated=True),
    "wanda_2_4": method(
        lambda c, stats: T.wanda(stats, pattern="nm", n=c.sparsity.n,
                                 m=c.sparsity.m, rules=_sparse_rules(c)),
        "Wanda {c.sparsity.n}:{c.sparsity.m}{sparse_head}", calibrated=True),
    "asvd": method(
        lambda c, stats: T.asvd(stats, rank_ratio=c.lowrank.rank_ratio),
        "ASVD (mean|x|^0.5 input scaling), rank ratio "
        "{c.lowrank.rank_ratio}", calibrated=True),
    "svd_llm": method(
        lambda c, stats: T.svd_llm(stats, rank_ratio=c.lowrank.rank_ratio),
        "SVD-LLM (Cholesky whitening of X^T X), rank ratio "
        "{c.lowrank.rank_ratio}", calibrated=True),
    "svd_llm+int4_res": method(
        lambda c, stats: cj.chain(
            T.svd_llm(stats, rank_ratio=c.lowrank.residual_rank_ratio,
                      residual=True),
            T.quantize(c.quant.bits, group_size=c.quant.group_size,
                       rules=_head_rules(c))),
        "SVD-LLM rank ratio {c.lowrank.residual_rank_ratio} (float factors) "
        "plus the residual in int{c.quant.bits} RTN, groups of "
        "{c.quant.group_size}{head}", calibrated=True),
    "awq_int4_g128": method(
        lambda c, stats: awq(stats, c.quant.bits,
                             group_size=c.quant.group_size,
                             groups=transformer.scale_groups(_model_cfg(c)),
                             rules=_head_rules(c)),
        "AWQ int{c.quant.bits} asymmetric, groups of {c.quant.group_size}: "
        "alpha grid + clip search, scales folded into LayerNorm/value where "
        "possible{head}", calibrated=True),
    "awq_int3_g128": method(
        lambda c, stats: awq(stats, 3, group_size=c.quant.group_size,
                             groups=transformer.scale_groups(_model_cfg(c)),
                             rules=_head_rules(c)),
        "AWQ int3 asymmetric, groups of {c.quant.group_size}{head}",
        calibrated=True),
    "smoothquant_w8a8": method(
        lambda c, stats: smoothquant(
            stats, c.quant.smooth_alpha,
            groups=transformer.scale_groups(_model_cfg(c))),
        "SmoothQuant alpha {c.quant.smooth_alpha}: int8 per-channel weights x "
        "int8 per-token activations (int32 accumulation)", calibrated=True),
    "rotation_gptq_int4_g128": method(
        lambda c, stats, model, batches: rotation_gptq(
            quarot(jax.random.key(c.seed), transformer.rotation_plan(
                _model_cfg(c)), residual=False),
            model, batches, c.quant.bits, group_size=c.quant.group_size,
            rules=_head_rules(c)),
        "randomized Hadamard (value/out folded, online before out and fc2) "
        "then GPTQ int{c.quant.bits}, groups of {c.quant.group_size}{head}",
        with_model=True),
    "rotation_gptq_int3_g128": method(
        lambda c, stats, model, batches: rotation_gptq(
            quarot(jax.random.key(c.seed), transformer.rotation_plan(
                _model_cfg(c)), residual=False),
            model, batches, 3, group_size=c.quant.group_size,
            rules=_head_rules(c)),
        "randomized Hadamard then GPTQ int3, groups of "
        "{c.quant.group_size}{head}", with_model=True),
    "float32_ft": method(
        lambda c, *a, **k: train_lm.float_recipe(
            c, *a, name="float32_ft", **k)[0],
        "control: the float model fine-tuned {c.finetune.steps} steps with "
        "the training rows' optimizer and data (no compression)",
        trained=True),
    "qat_int4_g128": method(
        lambda c, *a, **k: train_lm.qat_recipe(
            c, *a, name="qat_int4_g128", bits=c.quant.bits,
            group_size=c.quant.group_size, rules=_head_rules(c), **k)[0],
        "QAT (LSQ steps, straight-through) int{c.quant.bits} g"
        "{c.quant.group_size}, {c.finetune.steps} steps from the float "
        "model, exported to QArray{head}", trained=True),
    "qat_ternary": method(
        lambda c, *a, **k: train_lm.qat_recipe(
            c, *a, name="qat_ternary", format="ternary",
            rules=_head_rules(c), **k)[0],
        "QAT ternary per channel (learned scale), {c.finetune.steps} steps"
        "{head}", trained=True),
    "kd_2_4": method(
        lambda c, *a, **k: train_lm.distill_recipe(
            c, *a, name="kd_2_4", student=METHODS["nm_2_4"](c),
            student_name="nm_2_4", **k)[0],
        "magnitude {c.sparsity.n}:{c.sparsity.m}, kept values recovered by "
        "logit distillation from the float model (T {c.finetune.temperature},"
        " alpha {c.finetune.alpha}), {c.finetune.steps} steps{sparse_head}",
        trained=True),
    "rigl_90": method(
        lambda c, *a, **k: train_lm.sparse_recipe(
            c, *a, name="rigl_90", method="rigl",
            sparsity=c.finetune.high_sparsity, rules=_sparse_rules(c),
            **k)[0],
        "RigL {c.finetune.high_sparsity:.0%} ({c.finetune.distribution}): "
        "magnitude masks, then drop/regrow by gradient every "
        "{c.finetune.update_every} steps, {c.finetune.steps} steps"
        "{sparse_head}", trained=True),
    "gmp_90": method(
        lambda c, *a, **k: train_lm.sparse_recipe(
            c, *a, name="gmp_90", method="gmp",
            sparsity=c.finetune.high_sparsity, rules=_sparse_rules(c),
            **k)[0],
        "gradual magnitude pruning to {c.finetune.high_sparsity:.0%} (cubic "
        "schedule), {c.finetune.steps} steps{sparse_head}", trained=True),
    "codebook3": method(
        lambda c: T.quantize(format="codebook3", group_size=c.quant.group_size,
                             rules=_head_rules(c)),
        "3-bit Lloyd codebook per {c.quant.group_size} input rows{head}"),
}


def make_transform(name: str, c: Config, stats=None, model=None,
                   batches=None) -> cj.Transform:
  """The transform of a (non-sequential) row, called as its tags require."""
  build = METHODS[name]
  if getattr(build, "with_model", False):
    return build(c, stats, model, batches)
  if getattr(build, "calibrated", False):
    return build(c, stats)
  return build(c)


def describe_method(name: str, c: Config) -> str:
  build = METHODS[name]
  template = getattr(build, "description", name)
  return template.format(c=c, **_notes(c))


def parse_methods(spec: str) -> list[str]:
  names = [m.strip() for m in spec.split(",") if m.strip()]
  unknown = [m for m in names if m not in METHODS]
  if unknown:
    raise ValueError(f"unknown method(s) {unknown} in config.methods; "
                     f"available: {sorted(METHODS)}")
  if len(set(names)) != len(names):
    raise ValueError(f"config.methods names a row twice: {spec!r}")
  return names


# ---------------------------------------------------------------------------
# Data, model, training
# ---------------------------------------------------------------------------

def load_data(c: Config):
  return stdlib_text.load(max_bytes=c.data.max_bytes,
                          max_val_bytes=c.data.max_val_bytes,
                          val_files=c.data.val_files, return_split=True)


def build_model(c: Config) -> transformer.TransformerLM:
  return transformer.TransformerLM(
      transformer.TransformerConfig.from_dict(c.model.to_dict()))


def baseline_key(c: Config, data_digest: str) -> str:
  """Hash of everything that determines the trained float weights."""
  train = c.train.to_dict()
  train.pop("log_every", None)
  blob = json.dumps(dict(version=CACHE_VERSION, seed=c.seed,
                         data=c.data.to_dict(), data_digest=data_digest,
                         model=c.model.to_dict(), train=train),
                    sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_optimizer(c: Config) -> optax.GradientTransformation:
  t = c.train
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.learning_rate,
      warmup_steps=t.warmup, decay_steps=max(t.steps, t.warmup + 1),
      end_value=t.learning_rate * t.end_lr_fraction)
  # No weight decay on biases and LayerNorm parameters.
  decay_mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
  return optax.chain(
      optax.clip_by_global_norm(t.grad_clip),
      optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=t.weight_decay,
                  mask=decay_mask))


def train_baseline(c: Config, model, train_data: np.ndarray,
                   log: Callable[[str], None] = print) -> tuple[Any, dict]:
  """Trains the float model; returns ({'params': ...}, stats)."""
  t = c.train
  if t.steps < 1:
    raise ValueError(f"config.train.steps must be >= 1, got {t.steps}")
  seq = c.data.seq_len
  # jit: flax's eager init dispatches op by op, seconds even for this model.
  variables = jax.jit(model.init)(jax.random.key(c.seed),
                                  jnp.zeros((1, seq), jnp.int32))
  params = variables["params"]
  opt = make_optimizer(c)
  opt_state = opt.init(params)

  def loss_fn(p, batch):
    logits = model.apply({"params": p}, batch[:, :-1])
    return transformer.next_token_loss(logits, batch[:, 1:]).mean()

  @jax.jit
  def step(p, s, batch):
    loss, grads = jax.value_and_grad(loss_fn)(p, batch)
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  batches = stdlib_text.train_batches(train_data, seq, t.batch_size,
                                      seed=c.seed)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  log(f"training float baseline: {n_params:,} params, {t.steps} steps of "
      f"{t.batch_size}x{seq} bytes")
  start = time.time()
  losses, window_start = [], time.time()
  first_loss = last_loss = None
  for i in range(1, t.steps + 1):
    params, opt_state, loss = step(params, opt_state, next(batches))
    losses.append(loss)
    if i == 1:
      first_loss = float(loss)
      log(f"  step {i:5d}  loss {first_loss:.4f}  (compiled in "
          f"{time.time() - start:.1f}s)")
      losses, window_start = [], time.time()
    elif i % t.log_every == 0 or i == t.steps:
      mean = float(np.mean(jax.device_get(losses)))
      sps = len(losses) / max(time.time() - window_start, 1e-9)
      eta = (t.steps - i) / sps
      log(f"  step {i:5d}  loss {mean:.4f}  {sps:5.2f} steps/s  "
          f"ETA {eta:4.0f}s")
      last_loss, losses, window_start = mean, [], time.time()
  seconds = time.time() - start
  stats = dict(steps=t.steps, seconds=round(seconds, 2),
               first_loss=first_loss,
               final_train_loss=first_loss if last_loss is None else last_loss,
               n_params=int(n_params))
  log(f"trained in {seconds:.1f}s")
  return {"params": params}, stats


def _same_structure(a: Any, b: Any) -> bool:
  shapes = lambda t: [(p, tuple(x.shape)) for p, x in leaves_with_paths(t)]
  return shapes(a) == shapes(b)


def get_baseline(c: Config, model, train_data: np.ndarray, key: str,
                 workdir: str, log: Callable[[str], None] = print
                 ) -> tuple[Any, dict, bool]:
  """Restores the cached float model for `key`, or trains and caches it.

  Returns (variables, stats, cached).
  """
  cache_dir = os.path.join(workdir, "baseline", key)
  meta_path = os.path.join(cache_dir, "meta.json")
  template = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, c.data.seq_len), jnp.int32))
  if os.path.exists(meta_path):  # written last: marks a complete cache entry
    variables = jax.tree.map(jnp.asarray,
                             cj.restore(os.path.join(cache_dir, "params")))
    if _same_structure(variables, template):
      with open(meta_path) as f:
        stats = json.load(f)
      log(f"reusing cached float baseline {cache_dir}")
      return variables, stats, True
    log(f"cached baseline {cache_dir} does not match the model; retraining")
  variables, stats = train_baseline(c, model, train_data, log)
  cj.save(os.path.join(cache_dir, "params"), variables, force=True)
  with open(meta_path, "w") as f:
    json.dump(stats, f, indent=2)
  return variables, stats, False


# ---------------------------------------------------------------------------
# Evaluation and measurement
# ---------------------------------------------------------------------------

def make_eval_step(model):
  """jit(tree, batch) -> summed next-byte cross entropy, via compressjax.run."""

  @jax.jit
  def eval_step(tree, batch):
    logits = cj.run(model, tree, batch[:, :-1])
    return transformer.next_token_loss(logits, batch[:, 1:]).sum()

  return eval_step


def evaluate(eval_step, tree, c: Config, val_data: np.ndarray
             ) -> tuple[float, int]:
  """Returns (mean cross entropy in nats per byte, number of bytes)."""
  total, count = 0.0, 0
  for batch in stdlib_text.eval_batches(val_data, c.data.seq_len,
                                        c.eval.batch_size, c.eval.max_batches):
    total += float(eval_step(tree, batch))
    count += batch.shape[0] * (batch.shape[1] - 1)
  return total / count, count


def calibration_batches(c: Config, train_data: np.ndarray) -> list:
  """Model inputs of random training windows (never validation)."""
  batches = stdlib_text.train_batches(train_data, c.data.seq_len,
                                      c.calib.batch_size, seed=c.seed + 1)
  return [b[:, :-1] for b, _ in zip(batches, range(c.calib.batches))]


def calibration_stats(model, baseline: Any, batches: list) -> dict:
  """Per-layer input statistics of the float model on `batches`; their
  description (recorded with each calibrated row) names the text."""
  from compressjax.data.text import Calibration
  src = dict(kind="segments", source="Python stdlib source (training split)",
             tokenizer="bytes", samples=sum(len(b) for b in batches),
             seqlen=int(batches[0].shape[1]) if batches else 0)
  return capture(model, baseline, Calibration(tuple(batches), src))


def unigram_ppl(train_data: np.ndarray, val_data: np.ndarray) -> float:
  """Perplexity of add-one byte frequencies of the training set: the bar a
  model must clear to have learned anything beyond byte counts."""
  p = np.bincount(train_data, minlength=256) + 1.0
  p /= p.sum()
  return float(np.exp(-np.mean(np.log(p[val_data]))))


def layer_paths(baseline: Any, compressed: Any) -> set[str]:
  """Params counted as 'compressed layers': the kernels the transforms select
  by default, plus anything a rule compressed beyond them."""
  paths = {p for p, x in leaves_with_paths(baseline) if default_filter(p, x)}
  paths |= {p for p, x in leaves_with_paths(compressed) if cj.is_compressed(x)}
  return paths


def measure(baseline: Any, compressed: Any) -> dict:
  chosen = layer_paths(baseline, compressed)
  layers = [x for p, x in leaves_with_paths(compressed) if p in chosen]
  return dict(
      bits_per_weight=cj.bits_per_weight(layers),
      bits_per_weight_model=cj.bits_per_weight(compressed),
      size_bytes=int(cj.tree_nbytes(compressed)),
      compression_ratio=cj.compression_ratio(baseline, compressed))


def _safe_name(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


# ---------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------

def write_markdown(path: str, rows: list[dict], header: dict) -> None:
  lines = ["# compressjax: byte-level LM on stdlib source", ""]
  lines += [f"- **{k}**: {v}" for k, v in header.items()]
  lines += ["", "bits/w (layers): over the compressible kernels (the "
            "default filter: attention, MLP and head kernels; one a row "
            "leaves dense counts at 32). bits/w (model): over every "
            "parameter, embeddings, norms and biases included. Ratio: "
            "float32 bytes / compressed bytes. Seconds: time to compress (with "
            "XLA compilation, unless the workdir's jax_cache has it; "
            "training rows include their fine-tuning unless its finished "
            "checkpoint in the workdir was reused).",
            ""]
  lines += ["| method | val ppl | bits/w (layers) | bits/w (model) "
            "| size (KiB) | ratio | seconds | description |",
            "|---|---:|---:|---:|---:|---:|---:|---|"]
  for r in rows:
    lines.append(
        f"| {r['method']} | {r['value']:.3f} | {r['bits_per_weight']:.2f} | "
        f"{r['bits_per_weight_model']:.2f} | {r['size_bytes'] / 1024:.1f} | "
        f"{r['compression_ratio']:.2f}x | {r['seconds']:.2f} | "
        f"{r['description']} |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def write_plot(path: str, rows: list[dict]) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  xs = [r["bits_per_weight"] for r in rows]
  for r in rows:
    ax.scatter(r["bits_per_weight"], r["value"], s=30)
    ax.annotate(r["method"], (r["bits_per_weight"], r["value"]),
                textcoords="offset points", xytext=(5, 4), fontsize=8)
    if r["method"] == "float32":
      ax.axhline(r["value"], color="gray", lw=0.8, ls="--")
  ax.set_xscale("log", base=2)
  lo, hi = min(xs) / 1.3, max(xs) * 1.6  # room for the labels
  ax.set_xlim(lo, hi)
  ticks = [t for t in (1, 2, 3, 4, 6, 8, 16, 32) if lo <= t <= hi]
  ax.set_xticks(ticks, [str(t) for t in ticks])
  ax.set_xlabel("bits per weight (compressed layers)")
  ax.set_ylabel("validation perplexity (bytes)")
  ax.set_title("Perplexity vs size")
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def run_experiment(config: Config, workdir: str,
                   log: Callable[[str], None] = print) -> dict:
  """Runs the whole experiment; returns a dict with the rows and run facts.

  Keys: rows (as in results.json), baseline_cached (True when the float model
  came from the workdir cache), baseline_key, baseline_stats, seconds.
  """
  start = time.time()
  c = config
  names = parse_methods(c.methods)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(c.to_json_best_effort(indent=2, sort_keys=True))

  train_data, val_data, split = load_data(c)
  log(f"data: {len(train_data):,} train bytes from {len(split.train_files)} "
      f"files, {len(val_data):,} validation bytes from "
      f"{', '.join(split.val_files)}")
  model = build_model(c)
  key = baseline_key(c, split.digest)
  baseline, stats, cached = get_baseline(c, model, train_data, key, workdir,
                                         log)

  eval_step = make_eval_step(model)
  rows = []
  ckpt_root = os.path.join(workdir, "checkpoints")
  summary_root = os.path.join(workdir, "summaries")
  os.makedirs(ckpt_root, exist_ok=True)
  os.makedirs(summary_root, exist_ok=True)
  calib = calib_batches = None
  for i, name in enumerate(names, 1):
    build = METHODS[name]
    if getattr(build, "calibrated", False) and calib is None:
      t0 = time.time()
      # drawn once: one-shot stats, sequential and rotation rows share them
      calib_batches = calibration_batches(c, train_data)
      calib = calibration_stats(model, baseline, calib_batches)
      log(f"calibration: {c.calib.batches} x {c.calib.batch_size} windows "
          f"in {time.time() - t0:.1f}s")
    t0 = time.time()
    if getattr(build, "trained", False):
      compressed = build(c, model, baseline, train_data, workdir, log=log)
    elif getattr(build, "sequential", False):
      compressed = sequential(
          model, baseline, calib_batches,
          lambda stats: build(c, stats), progress=log)
    else:
      compressed = make_transform(name, c, calib, model,
                                  calib_batches).apply(baseline)
    compressed = jax.block_until_ready(compressed)
    compress_s = time.time() - t0
    t0 = time.time()
    loss, n_bytes = evaluate(eval_step, compressed, c, val_data)
    eval_s = time.time() - t0
    row = dict(method=name, description=describe_method(name, c),
               metric=METRIC, value=math.exp(loss), val_loss=loss,
               eval_bytes=n_bytes, **measure(baseline, compressed),
               seconds=round(compress_s, 3), eval_seconds=round(eval_s, 3))
    if getattr(build, "calibrated", False):  # what text, tokens, padding
      row["calibration"] = calib.description
    rows.append(row)
    log(f"[{i}/{len(names)}] {name:16s} ppl {row['value']:8.3f}  "
        f"bits/w {row['bits_per_weight']:6.3f} (model "
        f"{row['bits_per_weight_model']:6.3f})  ratio "
        f"{row['compression_ratio']:5.2f}x  compress {compress_s:.1f}s  "
        f"eval {eval_s:.1f}s")
    with open(os.path.join(summary_root, f"{_safe_name(name)}.txt"), "w") as f:
      f.write(cj.summary(baseline, compressed) + "\n")
    cj.save(os.path.join(ckpt_root, _safe_name(name)), compressed, force=True)

  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(rows, f, indent=2)
  header = {
      "model": (f"d_model {c.model.d_model}, {c.model.n_layers} layers, "
                f"{c.model.n_heads} heads, d_mlp {c.model.d_mlp}, seq_len "
                f"{c.data.seq_len}, {stats['n_params']:,} params"),
      "data": (f"{len(train_data):,} train / {len(val_data):,} val bytes of "
               f"Python stdlib source; val files {', '.join(split.val_files)}"),
      "training": (f"{stats['steps']} steps x {c.train.batch_size} x "
                   f"{c.data.seq_len} bytes, lr {c.train.learning_rate}, "
                   f"{stats['seconds']:.0f}s, final train loss "
                   f"{stats['final_train_loss']:.3f}" +
                   (" (cached)" if cached else "")),
      "eval": ((f"{rows[0]['eval_bytes']:,} validation bytes "
                f"({rows[0]['eval_bytes'] // c.data.seq_len} windows of "
                f"{c.data.seq_len}, spread over the set); " if rows else "") +
               f"unigram byte ppl {unigram_ppl(train_data, val_data):.2f}"),
      "baseline key": key,
  }
  write_markdown(os.path.join(workdir, "results.md"), rows, header)
  write_plot(os.path.join(workdir, "results.png"), rows)
  seconds = time.time() - start
  log(f"wrote {os.path.join(workdir, 'results.md')} ({seconds:.1f}s total)")
  return dict(rows=rows, baseline_cached=cached, baseline_key=key,
              baseline_stats=stats, seconds=seconds)


def define_flags() -> None:
  """Defines --config and --workdir. Called only when run as a program, so
  importing this module (tests, notebooks, other experiments defining their
  own --config) registers no flags."""
  config_flags.DEFINE_config_file(
      "config", _DEFAULT_CONFIG, "Experiment config file (a get_config() "
      "module); override fields with --config.train.steps=100 etc.")
  flags.DEFINE_string(
      "workdir", "runs/compress_lm", "Directory for the cached baseline, "
      "results and checkpoints.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  f = flags.FLAGS
  if not f["verbosity"].present:
    # orbax logs every save at INFO; --verbosity=0 brings it back.
    logging.set_verbosity(logging.WARNING)
  # Persistent XLA cache: a rerun skips most compilation (the eval programs
  # and the eager ops of the transforms), which is most of its time on CPU.
  jax.config.update("jax_compilation_cache_dir",
                    os.path.join(os.path.abspath(f.workdir), "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  run_experiment(f.config, f.workdir)
  with open(os.path.join(f.workdir, "results.md")) as fh:
    print(fh.read())


if __name__ == "__main__":
  define_flags()
  app.run(main)
