"""The shared harness of the compression experiments.

An experiment plugs a `Task` in (the unmodified model, its float baseline,
the metric, calibration inputs and, if it supports the training rows, a loss
and batches) and names rows (`experiments.rows`); `run` compresses the
baseline with every row, measures true sizes, evaluates the metric and writes

  results.json   one object per row: method, description, metric, value,
                 bits_per_weight, bits_per_weight_model, size_bytes,
                 compression_ratio, seconds, eval_seconds (+ the task's
                 extra fields, e.g. val_loss, eval_bytes)
  results.md     the same as a table, with the task's header facts
  results.png    metric vs bits per weight
  summaries/     per-layer report of every row
  checkpoints/   every compressed tree (orbax; exact round trip)

Nothing here knows the byte LM: `experiments.lm_task` builds its Task, and an
experiment on another model (a Hugging Face checkpoint, a classifier) builds
its own and reuses everything else. Also here: what makes runs reproducible
(`configure_jax`, `environment`) and the next-token perplexity evaluator any
causal LM task can use.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import re
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

import compressjax as cj
from compressjax.calibrate import capture
from compressjax.core.rules import default_filter
from compressjax.core.tree import leaves_with_paths
from compressjax.models import transformer

Log = Callable[[str], None]


# ---------------------------------------------------------------------------
# What an experiment plugs in
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Training:
  """What the training rows need from a task (experiments.recipes).

  loss(tree, batch) -> scalar: the task loss of the model on `tree`, a
  (possibly compressed, `cj.combine`d) variables tree. batches(batch_size,
  seed) -> batch_fn(step): a pure function of the step (exact resume).
  Distillation (recipes.distill_recipe) further assumes a causal LM: token
  batches (B, T + 1), model(inputs) -> next-token logits."""

  loss: Callable[[Any, Any], jax.Array]
  batches: Callable[[int, int], Callable[[int], Any]]


@dataclasses.dataclass(frozen=True)
class Task:
  """A model to compress and how to judge it; the harness's plug-in point.

  model: the unmodified Flax module (`cj.run(model, tree, inputs)`).
  baseline: its float variables, the tree every row compresses.
  metric: the name written to results.json (e.g. "val_ppl").
  evaluate(tree) -> dict with "value" (the metric) and any extra fields.
  calib_inputs(seed, n_batches, batch_size) -> list of model inputs (an
    array, or a tuple of positional args, per batch).
  key: identifies the baseline (training rows key their caches with it).
  title / header: results.md's title and facts (model, data, training).
  head: regex of the output head's kernel path, or None: low-bit rows keep
    it at config.quant.head_bits, sparsity rows leave it dense.
  scale_groups / rotation_plan: where AWQ/SmoothQuant scales and QuaRot
    rotations fold in this model (None: rows needing them refuse to run).
  training: what the training rows need (None: they refuse to run).
  calibration: what calib_inputs draws (source text, tokens, padding, ...),
    copied into the results.json record of every calibrated row.
  capture_method: the module method `capture` runs for calibration
    statistics (None: __call__; e.g. BERT's "pooled", so the pooler's kernel
    sees inputs too).
  columns: extra fields of evaluate's dict shown in results.md (e.g.
    zero-shot accuracy next to perplexity).
  info: anything else the entry point wants back (e.g. baseline_cached).
  """

  model: Any
  baseline: Any
  metric: str
  evaluate: Callable[[Any], dict]
  calib_inputs: Callable[[int, int, int], list]
  key: str
  title: str
  header: dict = dataclasses.field(default_factory=dict)
  head: str | None = None
  scale_groups: Any = None
  rotation_plan: Any = None
  training: Training | None = None
  calibration: dict = dataclasses.field(default_factory=dict)
  capture_method: Any = None
  columns: tuple[str, ...] = ()
  info: dict = dataclasses.field(default_factory=dict)


class Context:
  """What a row's build(ctx) sees: the config, the task and lazily computed,
  shared calibration (drawn once per run, so one-shot, sequential and
  rotation rows see the same windows)."""

  def __init__(self, config, task: Task, workdir: str, log: Log = print,
               **precomputed):
    self.config = config
    self.task = task
    self.workdir = workdir
    self.log = log
    for k, v in precomputed.items():  # e.g. stats=... (tests, sweeps)
      if k not in ("stats", "calib_inputs"):
        raise TypeError(f"Context: unknown precomputed {k!r}")
      self.__dict__[k] = v

  @property
  def model(self):
    return self.task.model

  @property
  def baseline(self):
    return self.task.baseline

  @functools.cached_property
  def calib_inputs(self) -> list:
    c = self.config.calib
    return self.task.calib_inputs(c.seed, c.batches, c.batch_size)

  @functools.cached_property
  def stats(self) -> dict:
    """Per-layer input statistics of the float model on calib_inputs."""
    t0 = time.time()
    stats = jax.block_until_ready(
        capture(self.model, self.baseline, self.calib_inputs,
                method=self.task.capture_method))
    c = self.config.calib
    self.log(f"calibration: {c.batches} x {c.batch_size} windows (seed "
             f"{c.seed}) in {time.time() - t0:.1f}s")
    return stats

  def require(self, what: str):
    """The task's scale_groups, rotation_plan or training, or a clear error
    naming the task hook that is missing."""
    value = getattr(self.task, what)
    if value is None:
      raise ValueError(f"this row needs the task's {what!r}, which "
                       f"{self.task.title!r} does not provide; drop the row "
                       "from config.methods or give the Task one")
    return value


# ---------------------------------------------------------------------------
# Reproducibility
# ---------------------------------------------------------------------------

# XLA CPU flags that make a run's numbers independent of the machine's core
# count and, among x86 CPUs with AVX2, of its instruction set. Measured with
# jax/jaxlib 0.10.2: the default 2000-step baseline trained on 1 core
# (taskset) is bit-identical to the one trained on 2; without the flags, 200
# steps on 1 core, on 2 cores and with Eigen's threading off gave three
# different sets of weights.
PINNED_XLA_FLAGS = (
    # YNNPACK fusions (on by default for dots, reductions, elementwise ops)
    # split work by the thread pool's size: 1 and 2 cores gave different
    # weights; without them XLA's own kernels gave identical ones.
    "--xla_cpu_experimental_ynn_fusion_type=",
) + ((
    # LLVM code generation targets the host's vector width, which changes
    # the association of vectorized reductions: AVX512, AVX2, AVX and SSE4.2
    # codegen gave four different baselines on one machine. (Other
    # architectures: nothing to pin, and not bit-identical to x86 anyway.)
    "--xla_cpu_max_isa=AVX2",
) if platform.machine().lower() in ("x86_64", "amd64") else ())


def pin_xla_flags() -> list[str]:
  """Adds PINNED_XLA_FLAGS to XLA_FLAGS (those the user has not set). Must
  run before jax starts its backend (the flags are read once); returns the
  flags added."""
  from jax._src import xla_bridge
  if xla_bridge.backends_are_initialized():
    raise RuntimeError("pin_xla_flags() must run before any jax computation "
                       "(the CPU backend reads XLA_FLAGS once, at start)")
  current = os.environ.get("XLA_FLAGS", "")
  added = []
  for flag in PINNED_XLA_FLAGS:
    if flag.split("=")[0] not in current:
      added.append(flag)
  os.environ["XLA_FLAGS"] = " ".join([current] + added).strip()
  return added


def configure_jax(workdir: str | None = None) -> None:
  """What the experiments' entry points pin before any computation.

  * PINNED_XLA_FLAGS (see there). What still changes the numbers: the
    jax/jaxlib version (another compiler), a CPU without AVX2 or not x86,
    another backend (GPU/TPU), another data source (`config.data.source =
    "installed"`: the stdlib bytes differ between Python patch releases).
    results.md's header records them (`environment()`, the data digest).
  * a persistent compilation cache in <workdir>/jax_cache: a rerun skips
    most compilation, which is most of its time on CPU.
  """
  pin_xla_flags()
  if workdir is not None:
    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(os.path.abspath(workdir), "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def environment() -> dict:
  """What can change the numbers across machines, for results headers."""
  import jaxlib
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [ln.split(":", 1)[1].strip() for ln in f
               if ln.startswith("model name")]
    if names:
      cpu = names[0]
  except OSError:
    pass
  return dict(python=platform.python_version(), jax=jax.__version__,
              jaxlib=jaxlib.__version__,
              backend=jax.default_backend(), cpu=cpu,
              cores=len(os.sched_getaffinity(0)) if hasattr(
                  os, "sched_getaffinity") else os.cpu_count(),
              xla_flags=os.environ.get("XLA_FLAGS", ""))


# ---------------------------------------------------------------------------
# Causal LM perplexity (any task whose model maps tokens to next-token logits)
# ---------------------------------------------------------------------------

def make_eval_step(model):
  """jit(tree, batch) -> summed next-token cross entropy via cj.run, batch
  (B, T + 1) of token ids: inputs batch[:, :-1], targets batch[:, 1:]."""

  @jax.jit
  def eval_step(tree, batch):
    logits = cj.run(model, tree, batch[:, :-1])
    return transformer.next_token_loss(logits, batch[:, 1:]).sum()

  return eval_step


def perplexity_metric(model, batches: Sequence[np.ndarray]
                      ) -> Callable[[Any], dict]:
  """tree -> dict(value=perplexity, val_loss=nats per token, eval_bytes=
  number of predicted tokens) over fixed `batches` (a list, reused)."""
  eval_step = make_eval_step(model)
  batches = [np.asarray(b) for b in batches]
  count = sum(b.shape[0] * (b.shape[1] - 1) for b in batches)

  def evaluate(tree) -> dict:
    # summed in float64 on the host, in batch order
    total = math.fsum(float(eval_step(tree, b)) for b in batches)
    loss = total / count
    return dict(value=math.exp(loss), val_loss=loss, eval_bytes=count)

  return evaluate


# ---------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------

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


def safe_name(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------

# Rows whose records carry the task's calibration description.
CALIBRATED = frozenset({"stats", "calib"})


def _compress(row, ctx: Context) -> tuple[Any, float]:
  t0 = time.time()
  compressed = jax.block_until_ready(row.compress(ctx))
  return compressed, time.time() - t0


def run_rows(ctx: Context, rows: Sequence[Any], *, save: bool = True,
             overlap_training: bool = True,
             on_compressed: Callable[[Any, Any, dict], None] | None = None
             ) -> list[dict]:
  """Compresses the baseline with every row and evaluates it; returns the
  results.json rows. Writes summaries/ and checkpoints/ when `save`.
  `on_compressed(row, tree, record)`, if given, sees every compressed tree
  (e.g. to export one) and may add fields to its record.

  With overlap_training, the rows that fine-tune (needs "training") run one
  after another in a background thread from the start, alongside the
  others: post-training rows spend most of their time compiling on one
  core, fine-tuning keeps the other busy. Each computation is the same, so
  are the numbers (the pinned XLA flags make them independent of threads);
  a training row's `seconds` is then its wall time while sharing the CPU.
  """
  task = ctx.task
  out = []
  dirs = {d: os.path.join(ctx.workdir, d) for d in ("checkpoints",
                                                    "summaries")}
  for d in dirs.values():
    os.makedirs(d, exist_ok=True)
  background = [r for r in rows if "training" in r.needs] if (
      overlap_training) else []
  pool = futures = None
  if background:
    from concurrent.futures import ThreadPoolExecutor
    pool = ThreadPoolExecutor(max_workers=1,
                              thread_name_prefix="training-rows")
    futures = {r.name: pool.submit(_compress, r, ctx) for r in background}
  try:
    for i, row in enumerate(rows, 1):
      if futures and row.name in futures:
        compressed, compress_s = futures[row.name].result()
      else:
        if "stats" in row.needs:
          ctx.stats  # computed once, before the row's clock starts
        compressed, compress_s = _compress(row, ctx)
      t0 = time.time()
      result = task.evaluate(compressed)
      eval_s = time.time() - t0
      rec = dict(method=row.name, description=row.description,
                 metric=task.metric, **result,
                 **measure(task.baseline, compressed),
                 seconds=round(compress_s, 3), eval_seconds=round(eval_s, 3))
      if row.needs & CALIBRATED:
        rec["calibration"] = dict(task.calibration)
      if on_compressed is not None:
        on_compressed(row, compressed, rec)
      out.append(rec)
      ctx.log(f"[{i}/{len(rows)}] {row.name:16s} {task.metric} "
              f"{rec['value']:8.3f}  bits/w {rec['bits_per_weight']:6.3f} "
              f"(model {rec['bits_per_weight_model']:6.3f})  ratio "
              f"{rec['compression_ratio']:5.2f}x  compress {compress_s:.1f}s"
              f"  eval {eval_s:.1f}s")
      if save:
        with open(os.path.join(dirs["summaries"],
                               f"{safe_name(row.name)}.txt"), "w") as f:
          f.write(cj.summary(task.baseline, compressed) + "\n")
        cj.save(os.path.join(dirs["checkpoints"], safe_name(row.name)),
                compressed, force=True)
  finally:
    if pool is not None:
      pool.shutdown(wait=True, cancel_futures=True)
  return out


def run(config, task: Task, rows: Sequence[Any], workdir: str,
        log: Log = print, header: dict | None = None, save: bool = True,
        overlap_training: bool = True,
        on_compressed: Callable[[Any, Any, dict], None] | None = None
        ) -> list[dict]:
  """Runs `rows` on `task` (see run_rows); writes results.json/md/png into
  workdir."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  ctx = Context(config, task, workdir, log)
  results = run_rows(ctx, rows, save=save,
                     overlap_training=overlap_training,
                     on_compressed=on_compressed)
  write_results(workdir, results, task.title,
                {**task.header, **(header or {})}, task.columns)
  return results


# ---------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------

MD_COLUMNS = ("method", "value", "bits/w (layers)", "bits/w (model)",
              "size (KiB)", "ratio", "seconds", "description")


def write_results(workdir: str, rows: list[dict], title: str,
                  header: dict, columns: Sequence[str] = ()) -> None:
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(rows, f, indent=2)
  write_markdown(os.path.join(workdir, "results.md"), rows, title, header,
                 columns)
  if rows:
    write_plot(os.path.join(workdir, "results.png"), rows)


def _cell(v) -> str:
  return f"{v:.3f}" if isinstance(v, float) else str(v)


def write_markdown(path: str, rows: list[dict], title: str,
                   header: dict, columns: Sequence[str] = ()) -> None:
  """results.md: header facts, then one table row per result; `columns`:
  extra result fields shown after the metric."""
  metric = rows[0]["metric"] if rows else "value"
  lines = [f"# {title}", ""]
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
  extra = "".join(f" {c.replace('_', ' ')} |" for c in columns)
  lines += [f"| method | {metric.replace('_', ' ')} |{extra} bits/w (layers) "
            "| bits/w (model) | size (KiB) | ratio | seconds | description |",
            "|---|---:|" + "---:|" * len(columns) + "---:|---:|---:|---:|"
            "---:|---|"]
  for r in rows:
    cells = "".join(f" {_cell(r.get(c, ''))} |" for c in columns)
    lines.append(
        f"| {r['method']} | {r['value']:.3f} |{cells} "
        f"{r['bits_per_weight']:.2f} | "
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
  ax.set_ylabel(rows[0]["metric"].replace("_", " "))
  ax.set_title(f"{rows[0]['metric'].replace('_', ' ')} vs size")
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ---------------------------------------------------------------------------
# absl entry points
# ---------------------------------------------------------------------------

def define_flags(default_config: str | None, default_workdir: str) -> None:
  """--config (an ml_collections config file) and --workdir. Called only by
  entry points run as programs, so importing modules registers no flags."""
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file(
      "config", default_config, "Experiment config file (a get_config() "
      "module); override fields with --config.train.steps=100 etc.")
  flags.DEFINE_string("workdir", default_workdir, "Directory for the cached "
                      "baseline, results and checkpoints.")


def setup_main(argv) -> tuple[Any, str]:
  """Checks argv, quiets orbax's INFO logging (unless --verbosity is given),
  pins what `configure_jax` pins; returns (config, workdir)."""
  from absl import app
  from absl import flags
  from absl import logging
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  f = flags.FLAGS
  if f.config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/qat.py")
  if not f["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  configure_jax(f.workdir)
  return f.config, f.workdir
