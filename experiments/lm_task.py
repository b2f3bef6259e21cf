"""The default experiment's task: a byte-level transformer LM trained on the
Python standard library's source (`compressjax.data.stdlib_text`, a pinned
snapshot, so the bytes are the same on every machine), judged by validation
perplexity.

`task(config, workdir)` returns the `harness.Task`: the float model is
trained once and cached in <workdir>/baseline/<key>, the key a hash of
everything that determines its weights (data bytes, model, training config,
seed), so reruns and runs that change only compression settings reuse it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import compressjax as cj
from compressjax.core.tree import leaves_with_paths
from compressjax.data import stdlib_text
from compressjax.models import transformer
from experiments import harness
from experiments import rows as rows_lib

Config = ml_collections.ConfigDict

METRIC = "val_ppl"
# The default experiment's config file, resolved against this file so it
# works from any directory.
DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
    "default.py")
TITLE = "compressjax: byte-level LM on stdlib source"

# Bump when the model or training code changes in a way the config does not
# show, so stale cached baselines are not reused.
CACHE_VERSION = 2


def load_data(c: Config):
  """(train, val, split) uint8 bytes of the configured stdlib split."""
  return stdlib_text.load(max_bytes=c.data.max_bytes,
                          max_val_bytes=c.data.max_val_bytes,
                          val_files=c.data.val_files, source=c.data.source,
                          return_split=True)


def model_config(c: Config) -> transformer.TransformerConfig:
  return transformer.TransformerConfig.from_dict(c.model.to_dict())


def build_model(c: Config) -> transformer.TransformerLM:
  return transformer.TransformerLM(model_config(c))


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
  return optimizer(c.train)


def optimizer(t: Any) -> optax.GradientTransformation:
  """AdamW with warmup + cosine decay and clipping, from a training section
  (learning_rate, warmup, steps, end_lr_fraction, grad_clip, weight_decay):
  the byte LM's `train`, kv_lm's `llama`."""
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
  template = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, c.data.seq_len), jnp.int32))
  return cached_training(os.path.join(workdir, "baseline", key), template,
                         lambda: train_baseline(c, model, train_data, log),
                         log, "float baseline")


def cached_training(cache_dir: str, template: Any,
                    train: Callable[[], tuple[Any, dict]],
                    log: Callable[[str], None] = print, what: str = "model"
                    ) -> tuple[Any, dict, bool]:
  """(variables, stats, cached): restored from `cache_dir` when a complete
  entry there has `template`'s structure, else `train()`ed and saved."""
  meta_path = os.path.join(cache_dir, "meta.json")
  if os.path.exists(meta_path):  # written last: marks a complete cache entry
    variables = jax.tree.map(jnp.asarray,
                             cj.restore(os.path.join(cache_dir, "params")))
    if _same_structure(variables, template):
      with open(meta_path) as f:
        stats = json.load(f)
      log(f"reusing cached {what} {cache_dir}")
      return variables, stats, True
    log(f"cached {what} {cache_dir} does not match the model; retraining")
  variables, stats = train()
  cj.save(os.path.join(cache_dir, "params"), variables, force=True)
  with open(meta_path, "w") as f:
    json.dump(stats, f, indent=2)
  return variables, stats, False


def unigram_ppl(train_data: np.ndarray, val_data: np.ndarray) -> float:
  """Perplexity of add-one byte frequencies of the training set: the bar a
  model must clear to have learned anything beyond byte counts."""
  p = np.bincount(train_data, minlength=256) + 1.0
  p /= p.sum()
  return float(np.exp(-np.mean(np.log(p[val_data]))))


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


def calibration_inputs(train_data: np.ndarray, seq_len: int, seed: int,
                       n_batches: int, batch_size: int) -> list:
  """Model inputs of random training windows (never validation)."""
  batches = stdlib_text.train_batches(train_data, seq_len, batch_size,
                                      seed=seed)
  return [b[:, :-1] for b, _ in zip(batches, range(n_batches))]


def task(c: Config, workdir: str, log: Callable[[str], None] = print,
         baseline: Any = None) -> harness.Task:
  """The byte-LM task of config `c`: its float baseline trained, or restored
  from the workdir's cache, or `baseline` (float variables of this model)."""
  workdir = os.path.abspath(workdir)
  train_data, val_data, split = load_data(c)
  log(f"data: {len(train_data):,} train bytes from {len(split.train_files)} "
      f"files, {len(val_data):,} validation bytes from "
      f"{', '.join(split.val_files)} ({c.data.source} stdlib, digest "
      f"{split.digest[:12]})")
  model = build_model(c)
  key = baseline_key(c, split.digest)
  if baseline is None:
    baseline, stats, cached = get_baseline(c, model, train_data, key,
                                           workdir, log)
  else:
    n = sum(x.size for x in jax.tree.leaves(baseline))
    stats, cached = dict(steps=0, seconds=0.0, first_loss=None,
                         final_train_loss=float("nan"), n_params=n), True
    key = "given-" + hashlib.sha256(b"".join(
        np.asarray(x).tobytes() for x in jax.tree.leaves(baseline))
                                    ).hexdigest()[:10]
  seq = c.data.seq_len
  val_batches = list(stdlib_text.eval_batches(val_data, seq,
                                              c.eval.batch_size,
                                              c.eval.max_batches))
  evaluate = harness.perplexity_metric(model, val_batches)
  n_eval = sum(b.shape[0] for b in val_batches)

  def loss(tree, batch):
    logits = cj.run(model, tree, batch[:, :-1])
    return transformer.next_token_loss(logits, batch[:, 1:]).mean()

  source = ("pinned CPython "
            f"{stdlib_text.SNAPSHOT_VERSION} snapshot" if c.data.source ==
            "snapshot" else "this Python's installed")
  env = harness.environment()
  header = {
      "model": (f"d_model {c.model.d_model}, {c.model.n_layers} layers, "
                f"{c.model.n_heads} heads, d_mlp {c.model.d_mlp}, seq_len "
                f"{seq}, {stats['n_params']:,} params"),
      "data": (f"{len(train_data):,} train / {len(val_data):,} val bytes of "
               f"Python stdlib source ({source}, digest "
               f"{split.digest[:12]}); val files "
               f"{', '.join(split.val_files)}"),
      "training": (f"{stats['steps']} steps x {c.train.batch_size} x "
                   f"{seq} bytes, lr {c.train.learning_rate}, "
                   f"{stats['seconds']:.0f}s, final train loss "
                   f"{stats['final_train_loss']:.3f}" +
                   (" (cached)" if cached else "")),
      "eval": (f"{n_eval * seq:,} validation bytes ({n_eval} windows of "
               f"{seq}, spread over the set); unigram byte ppl "
               f"{unigram_ppl(train_data, val_data):.2f}"),
      "calibration": (f"{c.calib.batches} x {c.calib.batch_size} training "
                      f"windows, seed {c.calib.seed}"),
      "baseline key": key,
      "environment": (f"Python {env['python']}, jax {env['jax']} / jaxlib "
                      f"{env['jaxlib']}, {env['backend']} ({env['cpu']}, "
                      f"{env['cores']} cores), XLA_FLAGS "
                      f"'{env['xla_flags']}'"),
  }
  return harness.Task(
      model=model, baseline=baseline, metric=METRIC, evaluate=evaluate,
      calib_inputs=lambda seed, n, bs: calibration_inputs(
          train_data, seq, seed, n, bs),
      key=key, title=TITLE, header=header, head=r"params/head/kernel",
      scale_groups=transformer.scale_groups(model_config(c)),
      rotation_plan=transformer.rotation_plan(model_config(c)),
      training=harness.Training(
          loss=loss,
          batches=lambda bs, seed: batch_fn(train_data, seq, bs, seed)),
      calibration=dict(
          kind="segments", source=f"training split ({source} stdlib)",
          tokenizer="bytes", samples=c.calib.batches * c.calib.batch_size,
          tokens=c.calib.batches * c.calib.batch_size * seq,
          padding_fraction=0.0, seqlen=seq, seed=c.calib.seed),
      info=dict(baseline_cached=cached, baseline_stats=stats,
                 split=split))


def run(c: Config, workdir: str, log: Callable[[str], None] = print,
        save: bool = True) -> tuple[list[dict], harness.Task]:
  """The byte-LM experiment of config `c`: every row of c.methods (parsed
  first, so a bad name fails before any training); returns (results.json
  rows, the task)."""
  rows = rows_lib.parse(c.methods, c)
  t = task(c, workdir, log)
  start = time.time()
  results = harness.run(c, t, rows, workdir, log, save=save)
  log(f"wrote {os.path.join(os.path.abspath(workdir), 'results.md')} "
      f"(rows in {time.time() - start:.1f}s)")
  return results, t
