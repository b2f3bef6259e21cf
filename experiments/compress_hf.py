r"""The compression table on a Hugging Face checkpoint.

    python -m experiments.compress_hf --model_dir=path/to/hf_dir \
        --workdir=runs/hf
    python -m experiments.compress_hf --model_dir=DIR \
        --config.methods=float32,int4_g128,gptq_int4_g128 \
        --config.data.eval_text=wiki.test.txt

1. Load the directory with `compressjax.models.hub.load_pretrained` (llama /
   mistral / qwen2, gpt2, bert and vit families).
2. Build the harness Task of its family (`TASKS`):
   decoders  perplexity over non-overlapping windows of a text file and
             zero-shot accuracy (compressjax.eval; built-in task
             python_syntax); calibration: random token segments of a text
   bert      mean cosine of sentence embeddings (mean pooling) to the float
             model's, on lines of the evaluation text; calibration: lines
             of the calibration text, length-bucketed and padded
   vit       top-1 agreement of the logits with the float model's on seeded
             random images; calibration: seeded random images
   The calibration source (text, tokens, padding) is in the header and in
   every calibrated row's results.json record.
3. Run the rows of config.methods (`experiments.rows`, the default
   experiment's registry) through `experiments.harness`: results.json /
   results.md / results.png, summaries/, checkpoints/.
4. Write config.export.gptq's tree in the GPTQ layout to <workdir>/gptq
   (`compressjax.models.gptq_export.save_gptq`; results.json's record of that
   row gets the export report).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import time
from typing import Any, Callable

import jax
import numpy as np

import compressjax as cj
from compressjax import eval as cj_eval
from compressjax.core.errors import CompressionError
from compressjax.data import stdlib_text
from compressjax.data import text as text_lib
from compressjax.models import gptq_export
from compressjax.models import hub
from experiments import harness
from experiments import rows as rows_lib

Log = Callable[[str], None]

DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
    "compress_hf.py")

# Output heads: low-bit rows keep them at config.quant.head_bits (float by
# default), sparsity rows leave them dense.
HEAD = r"params/(lm_head|classifier|pooler)(/.*)?/kernel"


# ---------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------

def _texts(c, log: Log) -> tuple[tuple[str, str], tuple[str, str]]:
  """((eval text, its name), (calibration text, its name)): the configured
  files, or the pinned stdlib snapshot's validation / training files."""
  need_stdlib = not (c.data.eval_text and c.data.calib_text)
  if need_stdlib:
    train, val, split = stdlib_text.load(
        max_bytes=c.data.max_bytes, max_val_bytes=c.data.max_val_bytes,
        val_files=c.data.val_files, source=c.data.source, return_split=True)
    where = f"stdlib {c.data.source} (digest {split.digest[:12]})"
    decode = lambda a: np.asarray(a, np.uint8).tobytes().decode(  # noqa: E731
        "utf-8", "replace")
  out = []
  for path, arr, what in ((c.data.eval_text, None if not need_stdlib else
                           val, "validation"),
                          (c.data.calib_text, None if not need_stdlib else
                           train, "training")):
    if path:
      out.append((text_lib.read_text(path), os.path.basename(path)))
    else:
      out.append((decode(arr), f"{where} {what} files"))
  log(f"eval text: {out[0][1]} ({len(out[0][0]):,} chars); calibration "
      f"text: {out[1][1]} ({len(out[1][0]):,} chars)")
  return out[0], out[1]


def _lines(text: str, n: int, seed: int | None = None) -> list[str]:
  """n non-blank lines of `text` (stripped): the first n, or n drawn with
  `seed` (calibration)."""
  lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
  if not lines:
    raise CompressionError("the text has no non-blank line")
  if seed is None or n >= len(lines):
    return lines[:n]
  pick = np.random.default_rng(seed).choice(len(lines), n, replace=False)
  return [lines[i] for i in sorted(pick)]


# ---------------------------------------------------------------------------
# Tasks per family
# ---------------------------------------------------------------------------

def _scale_groups(pre: hub.Pretrained):
  """The family module's AWQ/SmoothQuant scale groups, if it defines them."""
  mod = importlib.import_module(pre.module.__class__.__module__)
  fn = getattr(mod, "scale_groups", None)
  return None if fn is None else fn(pre.config)


def _calibration(c, calib: text_lib.Calibration, as_args: Callable
                 ) -> tuple[Callable, dict]:
  """calib_inputs(seed, n, bs) for the harness (the configured draw; any
  other asks for what was not prepared) and the description."""
  inputs = [as_args(b) for b in calib]
  want = (c.calib.seed, c.calib.batches, c.calib.batch_size)

  def calib_inputs(seed, n, bs):
    if (seed, n, bs) != want:
      raise CompressionError(
          f"compress_hf prepares config.calib's draw {want}; got "
          f"(seed, batches, batch_size) {(seed, n, bs)}")
    return inputs

  desc = {k: v for k, v in calib.description.items() if k != "shapes"}
  desc["shapes"] = [list(s) for s in calib.description["shapes"]]
  return calib_inputs, desc


def decoder_task(c, pre: hub.Pretrained, log: Log) -> dict:
  """Perplexity (value) and zero-shot accuracy of a causal LM."""
  (etext, ename), (ctext, cname) = _texts(c, log)
  tok = pre.tokenizer
  if tok is None:
    raise CompressionError(f"{pre.path} has no tokenizer.json: the decoder "
                           "tasks tokenize text")
  corpus = text_lib.tokenize(etext, tok, name=ename)
  calib = text_lib.random_segments(
      text_lib.tokenize(ctext, tok, name=cname),
      n=c.calib.batches * c.calib.batch_size, seqlen=c.calib.seqlen,
      seed=c.calib.seed, batch_size=c.calib.batch_size)
  zs_task = None
  if c.eval.zeroshot:
    zs_task = cj_eval.load_task(c.eval.zeroshot)
    if c.eval.zeroshot_items:
      zs_task = dataclasses.replace(zs_task,
                                    items=zs_task.items[:c.eval.zeroshot_items])
  max_windows = c.eval.max_windows or None

  def evaluate(tree) -> dict:
    p = cj_eval.perplexity(pre, tree, corpus, seqlen=c.eval.seqlen,
                           batch_size=c.eval.batch_size,
                           max_windows=max_windows, progress=False)
    out = dict(value=p.ppl, nll=p.nll, eval_tokens=p.tokens)
    if zs_task is not None:
      # with zeroshot_batch = batch_size and requests padded to seqlen - 1
      # tokens, zero-shot and perplexity share one compiled program per tree
      z = cj_eval.zeroshot(pre, tree, zs_task,
                           batch_size=c.eval.zeroshot_batch,
                           pad_multiple=c.eval.zeroshot_pad, progress=False)
      out.update(zeroshot_acc=z.acc, zeroshot_acc_norm=z.acc_norm,
                 zeroshot_stderr=z.acc_stderr)
    return out

  calib_inputs, desc = _calibration(c, calib, lambda b: b.ids)
  n_windows = len(corpus) // c.eval.seqlen
  return dict(
      metric="ppl", evaluate=evaluate, calib_inputs=calib_inputs,
      calibration=desc, columns=("zeroshot_acc",) if zs_task else (),
      header={"eval": (
          f"perplexity over {min(n_windows, max_windows or n_windows)} "
          f"windows of {c.eval.seqlen} tokens of {ename} "
          f"({len(corpus):,} tokens)" + (
              f"; zero-shot {zs_task.name} ({len(zs_task.items)} items, "
              f"chance {zs_task.chance:.2f})" if zs_task else ""))})


def _cosine(a, b) -> np.ndarray:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) *
                            np.linalg.norm(b, axis=-1))


def bert_task(c, pre: hub.Pretrained, log: Log) -> dict:
  """Mean cosine of sentence embeddings to the float model's."""
  (etext, ename), (ctext, cname) = _texts(c, log)
  tok = pre.tokenizer
  if tok is None:
    raise CompressionError(f"{pre.path} has no tokenizer.json: the BERT task "
                           "tokenizes text")
  n_calib = c.calib.batches * c.calib.batch_size
  calib = text_lib.text_batches(
      _lines(ctext, n_calib, seed=c.calib.seed), tok,
      batch_size=c.calib.batch_size, max_length=c.calib.seqlen,
      name=f"{cname}, {n_calib} lines (seed {c.calib.seed})")
  evals = text_lib.text_batches(
      _lines(etext, c.eval.samples), tok, batch_size=c.eval.batch_size,
      max_length=c.eval.seqlen, name=f"{ename}, first lines")
  embed = jax.jit(lambda t, ids, mask: cj.run(
      pre.module, t, ids, mask, method="sentence_embedding",
      allow_unused=True))  # the pooler head is not part of the embedding
  ref = [np.asarray(embed(pre.variables, *b.args())) for b in evals]

  def evaluate(tree) -> dict:
    cos = np.concatenate([_cosine(embed(tree, *b.args()), r)
                          for b, r in zip(evals, ref)])
    return dict(value=float(cos.mean()), min_cos=float(cos.min()))

  # TokenBatch as is: capture weights the statistics by its mask, so
  # padding stays out of them
  calib_inputs, desc = _calibration(c, calib, lambda b: b)
  desc["padding_in_statistics"] = False
  return dict(
      metric="embed_cos", evaluate=evaluate, calib_inputs=calib_inputs,
      calibration=desc, columns=("min_cos",), capture_method="pooled",
      header={"eval": (
          f"cosine of mean-pooled sentence embeddings to the float model's "
          f"on {evals.description['samples']} lines of {ename}")})


def vit_task(c, pre: hub.Pretrained, log: Log) -> dict:
  """Top-1 agreement and relative error of the logits vs the float model's
  on seeded random images (no image data is shipped)."""
  cfg = pre.config
  h, w = cfg.image_hw
  shape = (cfg.num_channels, h, w)
  rng = np.random.default_rng([c.seed, 11])
  n, bs = c.eval.samples, c.eval.batch_size
  evals = [rng.standard_normal((min(bs, n - i),) + shape).astype(np.float32)
           for i in range(0, n, bs)]
  logits = jax.jit(lambda t, x: cj.run(pre.module, t, x))
  ref = [np.asarray(logits(pre.variables, x)) for x in evals]

  def evaluate(tree) -> dict:
    ys = [np.asarray(logits(tree, x)) for x in evals]
    agree = np.concatenate([y.argmax(-1) == r.argmax(-1)
                            for y, r in zip(ys, ref)])
    num = sum(float(np.sum((y - r) ** 2)) for y, r in zip(ys, ref))
    den = sum(float(np.sum(r ** 2)) for r in ref)
    return dict(value=float(agree.mean()), logits_rel_err=(num / den) ** 0.5)

  crng = np.random.default_rng([c.calib.seed, 12])
  inputs = [crng.standard_normal((c.calib.batch_size,) + shape).astype(
      np.float32) for _ in range(c.calib.batches)]
  want = (c.calib.seed, c.calib.batches, c.calib.batch_size)

  def calib_inputs(seed, nb, b):
    if (seed, nb, b) != want:
      raise CompressionError(f"compress_hf prepares config.calib's draw "
                             f"{want}; got {(seed, nb, b)}")
    return inputs

  desc = dict(kind="images", source=f"N(0, 1) pixels (seed {c.calib.seed})",
              samples=c.calib.batches * c.calib.batch_size,
              shape=list(shape), padding_fraction=0.0)
  return dict(
      metric="top1_agree", evaluate=evaluate, calib_inputs=calib_inputs,
      calibration=desc, columns=("logits_rel_err",),
      header={"eval": f"top-1 agreement and relative logits error vs float "
                      f"on {n} N(0, 1) images {shape} (seed {c.seed})"})


# family name (hf.Family.name) -> its task
TASKS = {"llama": decoder_task, "gpt2": decoder_task, "bert": bert_task,
         "vit": vit_task}


def task(c, log: Log = print) -> tuple[harness.Task, hub.Pretrained]:
  """The harness Task of the checkpoint in c.model_dir, and the loaded
  Pretrained."""
  if not c.model_dir:
    raise CompressionError("no checkpoint: pass --model_dir=DIR (a Hugging "
                           "Face directory with config.json and safetensors)")
  t0 = time.time()
  pre = hub.load_pretrained(c.model_dir, dtype=c.dtype or None)
  family = pre.family.name
  if family not in TASKS:
    raise CompressionError(f"compress_hf has no task for the {family!r} "
                           f"family; it runs {sorted(TASKS)}")
  n = sum(x.size for x in jax.tree.leaves(pre.variables))
  log(f"loaded {c.model_dir}: {family}, {n:,} params in "
      f"{time.time() - t0:.1f}s")
  parts = TASKS[family](c, pre, log)
  digest = hashlib.sha256()
  for x in jax.tree.leaves(pre.variables):
    digest.update(np.asarray(x).tobytes())
  calib = parts["calibration"]
  header = {
      "model": (f"{os.path.abspath(c.model_dir)}: {family} "
                f"({pre.hf_config.get('model_type')}), {n:,} params, "
                f"{c.dtype or 'checkpoint'} weights"),
      **parts["header"],
      "calibration": (f"{calib.get('kind')} of {calib.get('source')}: "
                      f"{calib.get('samples')} samples, "
                      f"{calib.get('tokens', 'n/a')} tokens, padding "
                      f"{100 * calib.get('padding_fraction', 0):.1f}%"),
  }
  env = harness.environment()
  header["environment"] = (f"jax {env['jax']}, {env['backend']} "
                           f"({env['cpu']}, {env['cores']} cores)")
  t = harness.Task(
      model=pre.module, baseline=pre.variables, metric=parts["metric"],
      evaluate=parts["evaluate"], calib_inputs=parts["calib_inputs"],
      key=digest.hexdigest()[:16],
      title=f"compressjax on {os.path.basename(os.path.abspath(c.model_dir))}",
      header=header, head=HEAD, scale_groups=_scale_groups(pre),
      calibration=calib, capture_method=parts.get("capture_method"),
      columns=parts["columns"], info=dict(family=family))
  return t, pre


def export_gptq(path: str, pre: hub.Pretrained, tree: Any) -> dict:
  """save_gptq of `tree` into `path`; returns the report's summary."""
  rep = gptq_export.save_gptq(path, pre, tree, inexact_scales="warn")
  return dict(path=path, layers=len(rep.layers),
              bits=rep.quantization_config.get("bits"),
              group_size=rep.quantization_config.get("group_size"),
              scales_exact=rep.scales_exact,
              max_rel_error=max(l.rel_error for l in rep.layers))


def run(c, workdir: str, log: Log = print, save: bool = True
        ) -> tuple[list[dict], harness.Task]:
  """Every row of c.methods on the checkpoint (parsed first, so a bad name
  fails before loading); writes results.* and the GPTQ export."""
  rows = rows_lib.parse(c.methods, c)
  names = [r.name for r in rows]
  if c.export.gptq and c.export.gptq not in names:
    raise CompressionError(f"config.export.gptq {c.export.gptq!r} is not a "
                           f"row of config.methods {names}")
  workdir = os.path.abspath(workdir)
  t, pre = task(c, log)

  def on_compressed(row, tree, rec):
    if row.name == c.export.gptq:
      rec["gptq_export"] = export_gptq(os.path.join(workdir, "gptq"), pre,
                                       tree)
      log(f"GPTQ export of {row.name}: {rec['gptq_export']}")

  results = harness.run(c, t, rows, workdir, log, save=save,
                        on_compressed=on_compressed)
  with open(os.path.join(workdir, "calibration.json"), "w") as f:
    json.dump(t.calibration, f, indent=2)
  log(f"wrote {os.path.join(workdir, 'results.md')}")
  return results, t


def main(argv):
  from absl import flags
  config, workdir = harness.setup_main(argv)
  if flags.FLAGS.model_dir:
    config.model_dir = flags.FLAGS.model_dir
  run(config, workdir)
  with open(os.path.join(workdir, "results.md")) as fh:
    print(fh.read())


if __name__ == "__main__":
  from absl import app
  from absl import flags
  harness.define_flags(DEFAULT_CONFIG, "runs/compress_hf")
  flags.DEFINE_string("model_dir", None, "Hugging Face checkpoint directory "
                      "(overrides config.model_dir).")
  app.run(main)
