"""Decode throughput of `eval.generate` on float32 vs int8 vs int4 trees.

A random Llama from the zoo (default ~50M parameters: vocab 32000, hidden
512, 6 layers, MLP 1536, untied head), quantized with round-to-nearest
(int8 per channel; int4 groups of 128) over the default filter (every
attention / MLP kernel and the LM head). For batch 1 and 16 it generates
`--new` tokens after random prompts of `--prompt` tokens (no early stop),
the trees interleaved round-robin `--repeats` times; compilation is
excluded by `generate` itself. Printed: median decode and prefill tokens/s
per tree and the ratio of each to float32's, from the same run.

  python bench/generate.py [--repeats 3] [--new 32] [--prompt 16]
      [--layers 6] [--hidden 512] [--vocab 32000] [--batches 1,16]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import compressjax as cj  # noqa: E402
from compressjax import eval as cj_eval  # noqa: E402
from compressjax.models import llama  # noqa: E402


def random_llama(vocab: int, hidden: int, layers: int, inter: int):
  """(module, variables): N(0, 0.02) matrices, unit norm scales; drawn in
  numpy from the init's shapes (no init compilation)."""
  cfg = llama.LlamaConfig(vocab_size=vocab, hidden_size=hidden,
                          intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=hidden // 64,
                          max_position_embeddings=2048)
  module = llama.LlamaForCausalLM(cfg)
  shapes = jax.eval_shape(module.init, jax.random.key(0),
                          jnp.zeros((1, 4), jnp.int32))
  rng = np.random.default_rng(0)

  def draw(path, s):
    if "scale" in jax.tree_util.keystr(path):
      return jnp.ones(s.shape, s.dtype)
    return jnp.asarray(rng.standard_normal(s.shape, np.float32) * 0.02)
  return module, jax.tree_util.tree_map_with_path(draw, shapes)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--new", type=int, default=32)
  ap.add_argument("--prompt", type=int, default=16)
  ap.add_argument("--layers", type=int, default=6)
  ap.add_argument("--hidden", type=int, default=512)
  ap.add_argument("--inter", type=int, default=1536)
  ap.add_argument("--vocab", type=int, default=32000)
  ap.add_argument("--batches", default="1,16")
  a = ap.parse_args()
  module, v = random_llama(a.vocab, a.hidden, a.layers, a.inter)
  n = sum(x.size for x in jax.tree.leaves(v))
  trees = {"float32": v,
           "int8": jax.jit(lambda t: cj.quantize(t, 8))(v),
           "int4_g128": jax.jit(lambda t: cj.quantize(t, 4, group_size=128))(v)}
  print(f"random Llama: {n / 1e6:.1f}M params ({a.layers} layers, hidden "
        f"{a.hidden}, vocab {a.vocab}); {jax.devices()[0].platform}; "
        f"prompt {a.prompt} tokens, {a.new} new, median of {a.repeats}")
  for name, t in trees.items():
    print(f"  {name:10s} {cj.tree_nbytes(t) / 2**20:8.1f} MiB")
  rng = np.random.default_rng(1)
  lm = cj_eval.causal_lm(module)
  for b in [int(x) for x in a.batches.split(",")]:
    prompts = rng.integers(0, a.vocab, (b, a.prompt)).tolist()
    dec = {k: [] for k in trees}
    pre = {k: [] for k in trees}
    comp = {}
    for r in range(a.repeats + 1):  # round 0 compiles (timed apart anyway)
      for k, t in trees.items():
        start = time.perf_counter()
        res = cj_eval.generate(lm, t, prompts, max_new_tokens=a.new,
                               eos_ids=())
        if r == 0:
          comp[k] = res.compile_seconds
          print(f"  batch {b:3d} {k:10s} compiled in {comp[k]:.1f}s "
                f"(call {time.perf_counter() - start:.1f}s)", flush=True)
          continue
        dec[k].append(res.decode_tokens_per_s)
        pre[k].append(res.prefill_tokens_per_s)
    print(f"batch {b}:  tree        decode tok/s  x float   prefill tok/s"
          "  x float")
    d0, p0 = statistics.median(dec["float32"]), statistics.median(
        pre["float32"])
    for k in trees:
      d, p = statistics.median(dec[k]), statistics.median(pre[k])
      print(f"          {k:10s} {d:12.1f} {d / d0:8.2f}x {p:14.1f} "
            f"{p / p0:8.2f}x")


if __name__ == "__main__":
  main()
