"""Calibrated-algorithm benchmarks: speed against the authors' algorithms in
PyTorch, and the sequential pipeline at scale.

--part layer (default): GPTQ int4 g128, SparseGPT 50% and 2:4, Wanda 50% and
  2:4 on `--layers` same-shaped layers (default 4 of 4096 x 4096, 4096
  calibration tokens), compile included: wall (and process CPU) seconds of
  all calls from a cold start, against bench/reference_torch.py (the papers'
  algorithms in PyTorch, single-threaded) run in `--torch`'s interpreter on
  the same machine just before. Same-shaped layers share one compiled
  function (jit per shape and config), so compilation is paid once per
  model's worth. `--compile_cache DIR` enables jax's persistent compilation
  cache (`calibrate.enable_compilation_cache`): a second run skips compiling.

--part pipeline: compressjax.calibrate.sequential GPTQ int4 g128 on a decoder
  built at random in the zoo (`--model 100m`: the byte TransformerLM, d_model
  768, 14 blocks, d_mlp 3072; `--model 1b`: a Llama of TinyLlama's shape,
  hidden 2048, 22 layers, GQA 32/4 heads, vocab 32000, bf16 weights), on
  `--calib_tokens` tokens: time per stage (calibrate, compress, next
  inputs), total wall, peak RSS. `--rerun` reruns the whole model per stage
  instead of caching stage inputs (the old cost, growing with depth).

  python bench/calibrated.py [--part layer] [--size 4096] [--layers 4]
      [--torch /tmp/torchvenv/bin/python] [--compile_cache DIR]
  python bench/calibrated.py --part pipeline --model 100m|1b [--rerun]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

# this checkout's compressjax (and configs/experiments), not an installed one
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

import jax
import jax.numpy as jnp
import numpy as np

ALGOS = ("gptq_int4_g128", "sparsegpt_50", "sparsegpt_2_4", "wanda_50",
         "wanda_2_4")


def _rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


# -- layer: speed against the reference --------------------------------------


def _torch_times(python: str, size: int, tokens: int, layers: int) -> dict:
  here = os.path.dirname(os.path.abspath(__file__))
  t0 = time.perf_counter()
  out = subprocess.run(
      [python, os.path.join(here, "reference_torch.py"), "--size", str(size),
       "--tokens", str(tokens), "--layers", str(layers), "--threads", "1"],
      capture_output=True, text=True, check=True)
  print(f"  (reference ran {time.perf_counter() - t0:.0f}s)")
  return json.loads(out.stdout.strip().splitlines()[-1])


def layer_bench(a) -> None:
  from compressjax.quantization.gptq import gptq_quantize
  from compressjax.sparsity.sparsegpt import sparsegpt_prune
  from compressjax.sparsity.wanda import wanda_prune

  size, tokens, layers = a.size, a.tokens, a.layers
  if a.reference:
    ref = json.loads(a.reference)
  else:
    ref = _torch_times(a.torch, size, tokens, layers) if a.torch else {}
  print(f"reference: {json.dumps(ref)}", flush=True)
  k = jax.random.split(jax.random.key(0), 3)
  mix = jax.random.normal(k[0], (size, size)) / size ** 0.5
  x = jax.random.normal(k[1], (tokens, size)) @ mix + 0.1 * jax.random.normal(
      k[2], (tokens, size))
  h = jax.block_until_ready(2 * x.T @ x / tokens)
  norm = jnp.sqrt(jnp.sum(x * x, 0))
  ws = [jax.random.normal(jax.random.key(10 + i), (size, size)) * 0.02
        for i in range(layers)]
  runs = {
      "gptq_int4_g128": lambda w: gptq_quantize(w, h, bits=4,
                                                group_size=128).codes,
      "sparsegpt_50": lambda w: sparsegpt_prune(w, h, sparsity=0.5).values,
      "sparsegpt_2_4": lambda w: sparsegpt_prune(w, h, pattern="nm", n=2,
                                                 m=4).values,
      "wanda_50": lambda w: wanda_prune(w, norm, sparsity=0.5).values,
      "wanda_2_4": lambda w: wanda_prune(w, norm, pattern="nm", n=2,
                                         m=4).values,
  }
  print(f"{layers} layers of {size}x{size}, {tokens} tokens, "
        f"{jax.devices()[0].platform} ({os.cpu_count()} cpus), compile "
        f"included; reference: PyTorch, 1 thread")
  print(f"{'algorithm':16s} {'first call':>10s} {'all calls':>10s} "
        f"{'cpu':>8s} {'ref wall':>9s} {'ratio':>6s} {'ref cpu':>8s} "
        f"{'cpu ratio':>9s}")
  for name, fn in runs.items():
    if a.only and name not in a.only.split(","):
      continue
    c0, t0 = time.process_time(), time.perf_counter()
    jax.block_until_ready(fn(ws[0]))
    first = time.perf_counter() - t0
    for w in ws[1:]:
      jax.block_until_ready(fn(w))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    r, rc = ref.get(name), ref.get(name + "_cpu")
    nan = float("nan")
    print(f"{name:16s} {first:10.2f} {wall:10.2f} {cpu:8.2f} "
          f"{r or nan:9.2f} {wall / r if r else nan:6.2f} "
          f"{rc or nan:8.2f} {cpu / rc if rc else nan:9.2f}", flush=True)


# -- pipeline: sequential at scale -------------------------------------------


def _decoder(name: str, seq: int):
  if name == "100m":
    from compressjax.models import transformer
    cfg = transformer.TransformerConfig(vocab_size=256, d_model=768,
                                        n_layers=14, n_heads=12, d_mlp=3072,
                                        seq_len=seq)
    model = transformer.TransformerLM(cfg)
    params = jax.jit(model.init)(jax.random.key(0),
                                 jnp.zeros((1, seq), jnp.int32))
    return model, params, 256
  from compressjax.models import llama
  cfg = llama.LlamaConfig(vocab_size=32000, hidden_size=2048,
                          intermediate_size=5632, num_hidden_layers=22,
                          num_attention_heads=32, num_key_value_heads=4,
                          max_position_embeddings=2048)
  model = llama.LlamaForCausalLM(cfg)
  # bf16 weights, initialized layer by layer (never a float32 copy)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 8), jnp.int32))
  leaves, treedef = jax.tree.flatten(shapes)
  init = jax.jit(lambda key, shape: (0.02 * jax.random.normal(
      key, shape)).astype(jnp.bfloat16), static_argnums=1)
  params = jax.tree.unflatten(treedef, [
      jnp.ones(x.shape, jnp.bfloat16) if x.ndim == 1 else
      init(jax.random.key(i), tuple(x.shape)) for i, x in enumerate(leaves)])
  return model, params, 32000


def pipeline_bench(a) -> None:
  import compressjax as cj
  from compressjax.calibrate import sequential
  from compressjax.quantization.gptq import gptq

  seq = a.seq
  model, params, vocab = _decoder(a.model, seq)
  n = sum(x.size for x in jax.tree.leaves(params))
  rows = max(a.calib_tokens // seq, 1)
  bs = max(rows // a.batches, 1)
  batches = [jax.random.randint(jax.random.key(100 + i), (bs, seq), 0, vocab)
             for i in range(max(rows // bs, 1))]
  print(f"sequential GPTQ int4 g128 on a {n / 1e6:.0f}M-param {a.model} "
        f"decoder ({jax.tree.leaves(params)[0].dtype}), {len(batches)} x "
        f"{bs} x {seq} = {len(batches) * bs * seq} tokens, "
        f"{'rerunning the model per stage' if a.rerun else 'cached inputs'}; "
        f"RSS after init {_rss_gib():.2f} GiB", flush=True)
  t0 = time.time()
  out = sequential(model, params, batches,
                   lambda s: gptq(s, 4, group_size=128),
                   progress=lambda m: print(m, flush=True),
                   cache_inputs=not a.rerun)
  jax.block_until_ready(jax.tree.leaves(out))
  wall = time.time() - t0
  print(f"wall {wall:.1f}s, peak RSS {_rss_gib():.2f} GiB, bits/w "
        f"{cj.bits_per_weight(out):.2f} (whole model)")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--part", choices=("layer", "pipeline"),
                  default="layer")
  ap.add_argument("--size", type=int, default=4096)
  ap.add_argument("--tokens", type=int, default=4096)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--torch", default="/tmp/torchvenv/bin/python")
  ap.add_argument("--reference", default="",
                  help="the reference's JSON line from an earlier run")
  ap.add_argument("--compile_cache", default="")
  ap.add_argument("--only", default="", help="comma-separated algorithms")
  ap.add_argument("--model", choices=("100m", "1b"), default="100m")
  ap.add_argument("--rerun", action="store_true")
  ap.add_argument("--calib_tokens", type=int, default=2048)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--batches", type=int, default=2)
  a = ap.parse_args()
  if a.compile_cache:
    from compressjax.calibrate import enable_compilation_cache
    enable_compilation_cache(a.compile_cache)
  if a.torch and not os.path.exists(a.torch):
    print(f"no reference interpreter at {a.torch}; ratios left out")
    a.torch = ""
  {"layer": layer_bench, "pipeline": pipeline_bench}[a.part](a)


if __name__ == "__main__":
  main()
