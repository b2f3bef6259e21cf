"""Kernel benchmark: quantized matmul and block-sparse attention, as ratios
against XLA baselines timed in the same process (medians of --repeats).

Quantized matmul (weight-only int8 and int4 (groups of 128), batch 1/16/256,
K = N = 4096 and 8192):
  * on GPU/TPU: the Pallas kernel vs bf16 `jnp.dot`; speedup = bf16 / kernel
    (goals on a GPU at batch 1: int8 >= 1.8x, int4 >= 3.2x).
  * on CPU (Pallas only interprets there): what the dispatch runs, the
    blocked XLA formulation (`pallas_kernels.xla_matmul`), vs a float32
    `jnp.dot` (the uncompressed model's matmul), vs the naive
    dequantize-then-dot, and vs the plain grouped einsum reference;
    ratio = time / float32 time (lower is better).
  W8A8 (int8 x int8, int32 accumulation) is reported the same way.

Block-sparse attention (GPU/TPU only; interpret mode on CPU measures
nothing): causal-free random block masks at 100/50/25/10% density, the kernel
vs the same kernel on a full mask (dense flash) and vs
`jax.nn.dot_product_attention`; goal: time <= 1.2 x density x dense time.

The default LM (`--lm`, configs/default.py: d_model 128, 4 layers, d_mlp
512, seq_len 128) at batch 16: the whole forward through `compressjax.run`
on a quantized tree (int8 per channel, int4 / nf4 groups of 128, fp8_e4m3,
mxfp4) vs the float forward, and each of its kernel shapes as one matmul
(x (16*128, K) @ W (K, N), as `run` dispatches it) vs the float matmul. All
variants of one comparison are timed in the same process, interleaved (one
call of each per round, medians over rounds), so drift hits them alike.

  python bench/kernels.py [--sizes 4096,8192] [--batches 1,16,256]
                          [--repeats 20] [--skip-attention] [--json out.json]
  python bench/kernels.py --lm [--lm-batch 16] [--repeats 20]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import layout, reference, xla_matmul
from timing import interleaved_medians, median_time as _median_time

# two warm-up calls: compile, then one more so caches are warm
median_time = functools.partial(_median_time, warmup=2)


def weights(n: int, bits: int, group: int | None, key):
  k1, k2 = jax.random.split(key)
  u = jax.random.randint(k1, (n, n), 0, 2**bits).astype(jnp.uint8)
  codes = layout.pack(u, bits, 0) if bits < 8 else (
      u.astype(jnp.int32) - 128).astype(jnp.int8)
  g = 1 if group is None else n // group
  scale = jax.random.uniform(k2, (g, n), jnp.float32, 0.5, 1.5) / 64
  offset = -(2**(bits - 1)) if bits < 8 else 0
  return codes, scale, dict(bits=bits, k=n, offset=offset)


def naive(x, codes, scale, *, bits, k, offset):
  """Dequantize the whole weight, then dot (what materializing does)."""
  q = layout.unpack(codes, bits, k, 0).astype(jnp.float32) + offset
  g = scale.shape[0]
  w = (q.reshape(g, k // g, -1) * scale[:, None]).reshape(k, -1)
  return (x.astype(jnp.float32) @ w).astype(x.dtype)


def bench_matmul_cpu(a, rows):
  print(f"{'shape':>12s} {'M':>4s} {'fmt':>10s} {'f32 ms':>8s} "
        f"{'blocked/f32':>12s} {'naive/f32':>10s} {'einsum/f32':>11s} "
        f"{'rel err':>8s}")
  for n in a.sizes:
    w32 = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    for m in a.batches:
      x = jax.random.normal(jax.random.key(1), (m, n), jnp.float32)
      f32 = median_time(jax.jit(jnp.dot), x, w32, repeats=a.repeats)
      for name, bits, group in (("int8", 8, None), ("int4_g128", 4, 128)):
        codes, scale, kw = weights(n, bits, group, jax.random.key(2))
        fast = jax.jit(lambda x, c, s: xla_matmul.quantized_matmul(
            x, c, s, **kw))
        ref = jax.jit(lambda x, c, s: reference.quantized_matmul(
            x, c, s, **kw))
        y, r = fast(x, codes, scale), ref(x, codes, scale)
        err = float(jnp.max(jnp.abs(y - r)) / jnp.max(jnp.abs(r)))
        t = {"blocked": median_time(fast, x, codes, scale, repeats=a.repeats),
             "naive": median_time(jax.jit(lambda x, c, s: naive(
                 x, c, s, **kw)), x, codes, scale, repeats=a.repeats),
             "einsum": median_time(ref, x, codes, scale, repeats=a.repeats)}
        row = dict(kind="weight_only", backend="cpu", n=n, m=m, fmt=name,
                   baseline="float32 dot", baseline_ms=f32 * 1e3,
                   rel_err=err, **{f"{k}_ms": v * 1e3 for k, v in t.items()},
                   **{f"{k}_ratio": v / f32 for k, v in t.items()})
        rows.append(row)
        print(f"{n:>5d}x{n:<6d} {m:>4d} {name:>10s} {f32 * 1e3:8.2f} "
              f"{t['blocked'] / f32:12.2f} {t['naive'] / f32:10.2f} "
              f"{t['einsum'] / f32:11.2f} {err:8.1e}")
      # W8A8: int8 activations and weights, exact int32 accumulation
      xq = jax.random.randint(jax.random.key(3), (m, n), -127, 128).astype(
          jnp.int8)
      wq = jax.random.randint(jax.random.key(4), (n, n), -127, 128).astype(
          jnp.int8)
      xs, ws = jnp.ones((m, 1)), jnp.ones((1, n))
      fast = jax.jit(xla_matmul.int8_matmul)
      ref = jax.jit(reference.int8_matmul)
      exact = bool(jnp.all(fast(xq, xs, wq, ws) == ref(xq, xs, wq, ws)))
      tf = median_time(fast, xq, xs, wq, ws, repeats=a.repeats)
      tr = median_time(ref, xq, xs, wq, ws, repeats=a.repeats)
      rows.append(dict(kind="w8a8", backend="cpu", n=n, m=m, fmt="int8xint8",
                       baseline="float32 dot", baseline_ms=f32 * 1e3,
                       blocked_ratio=tf / f32, int32_dot_ratio=tr / f32,
                       exact=exact))
      print(f"{n:>5d}x{n:<6d} {m:>4d} {'w8a8':>10s} {f32 * 1e3:8.2f} "
            f"{tf / f32:12.2f} {'':>10s} {tr / f32:11.2f} "
            f"{'exact' if exact else 'INEXACT':>8s}  (einsum = int32 dot)")


def bench_matmul_accel(a, rows):
  from pallas_kernels import quantized_matmul as qmm
  print(f"{'shape':>12s} {'M':>4s} {'fmt':>10s} {'bf16 ms':>8s} "
        f"{'kernel ms':>10s} {'speedup':>8s} {'xla-ref':>8s}")
  for n in a.sizes:
    w = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    for m in a.batches:
      x = jax.random.normal(jax.random.key(1), (m, n), jnp.bfloat16)
      bf16 = median_time(jax.jit(jnp.dot), x, w, repeats=a.repeats)
      for name, bits, group in (("int8", 8, None), ("int4_g128", 4, 128)):
        codes, scale, kw = weights(n, bits, group, jax.random.key(2))
        kern = jax.jit(lambda x, c, s: qmm.quantized_matmul(x, c, s, **kw))
        ref = jax.jit(lambda x, c, s: reference.quantized_matmul(
            x, c, s, **kw))
        tk = median_time(kern, x, codes, scale, repeats=a.repeats)
        tr = median_time(ref, x, codes, scale, repeats=a.repeats)
        y, r = kern(x, codes, scale), ref(x, codes, scale)
        err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - r.astype(
            jnp.float32))) / jnp.max(jnp.abs(r.astype(jnp.float32))))
        rows.append(dict(kind="weight_only", backend=jax.default_backend(),
                         n=n, m=m, fmt=name, baseline="bf16 dot",
                         baseline_ms=bf16 * 1e3, kernel_ms=tk * 1e3,
                         speedup=bf16 / tk, xla_ref_speedup=bf16 / tr,
                         rel_err=err))
        print(f"{n:>5d}x{n:<6d} {m:>4d} {name:>10s} {bf16 * 1e3:8.3f} "
              f"{tk * 1e3:10.3f} {bf16 / tk:8.2f} {bf16 / tr:8.2f}")


def bench_attention(a, rows):
  from pallas_kernels.attention import kernel as attn
  from pallas_kernels.attention import mask as masks
  b, h, L, d = 1, 8, a.seq, 128
  ks = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(kk, (b, h, L, d), jnp.bfloat16) for kk in ks)
  blk = 128
  nb = L // blk
  dense_mask = masks.FullMask((L, L))
  dense = jax.jit(lambda q, k, v: attn.block_sparse_attention(
      q, k, v, dense_mask, block_q=blk, block_kv=blk))
  t_dense = median_time(dense, q, k, v, repeats=a.repeats)
  # jax.nn.dot_product_attention takes (B, L, H, D)
  sw = lambda t: jnp.swapaxes(t, 1, 2)  # noqa: E731
  xla = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
      sw(q), sw(k), sw(v)))
  t_xla = median_time(xla, q, k, v, repeats=a.repeats)
  print(f"attention B{b} H{h} L{L} D{d} bf16: dense flash "
        f"{t_dense * 1e3:.3f} ms, jax.nn.dot_product_attention "
        f"{t_xla * 1e3:.3f} ms")
  rng = np.random.default_rng(0)
  for density in (1.0, 0.5, 0.25, 0.1):
    blocks = rng.random((h, nb, nb)) < density
    blocks[:, np.arange(nb), np.arange(nb)] = True  # no empty rows
    dense_bool = np.kron(blocks, np.ones((blk, blk), bool))
    m = masks.MultiHeadMask(tuple(masks.NumpyMask(dense_bool[i])
                                  for i in range(h)))
    info = masks.compile_mask(m, blk, blk)
    f = jax.jit(lambda q, k, v: attn.block_sparse_attention(
        q, k, v, m, block_q=blk, block_kv=blk))
    t = median_time(f, q, k, v, repeats=a.repeats)
    dens = float(masks.density(info))
    rows.append(dict(kind="attention", backend=jax.default_backend(),
                     density=dens, ms=t * 1e3, dense_ms=t_dense * 1e3,
                     xla_ms=t_xla * 1e3, ratio_vs_dense=t / t_dense,
                     goal=1.2 * dens))
    print(f"density {dens:5.2f}: {t * 1e3:8.3f} ms  vs dense "
          f"{t / t_dense:5.2f} (goal <= {1.2 * dens:4.2f})  vs xla "
          f"{t / t_xla:5.2f}")


LM_FORMATS = {  # name -> cj.quantize options
    "int8": dict(bits=8),
    "int4_g128": dict(bits=4, group_size=128),
    "nf4_g128": dict(format="nf4", group_size=128),
    "fp8_e4m3": dict(format="fp8_e4m3"),
    "mxfp4": dict(format="mxfp4"),
}


def _thunks(fns: dict, args: dict) -> dict:
  return {n: functools.partial(f, *args[n]) for n, f in fns.items()}


def bench_lm(a, rows):
  """The default LM's forward and kernel shapes at batch a.lm_batch."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, root)
  import compressjax as cj
  from compressjax.core.tree import leaves_with_paths
  from compressjax.models import transformer
  from configs import default

  c = default.get_config()
  model = transformer.TransformerLM(
      transformer.TransformerConfig.from_dict(c.model.to_dict()))
  seq = c.data.seq_len
  tokens = jax.random.randint(jax.random.key(0), (a.lm_batch, seq), 0, 256)
  params = jax.jit(model.init)(jax.random.key(1), tokens[:1])
  fwd = {"float": jax.jit(model.apply)}
  args = {"float": (params, tokens)}
  trees = {}
  for name, kw in LM_FORMATS.items():
    trees[name] = cj.quantize(params, **kw)
    fwd[name] = jax.jit(functools.partial(cj.run, model))
    args[name] = (trees[name], tokens)
    # the same forward with every weight scanned in K blocks (the path for
    # weights above xla_matmul.DENSE_TILE_BYTES), compiled ahead of time
    saved = xla_matmul.DENSE_TILE_BYTES
    xla_matmul.DENSE_TILE_BYTES = 0
    try:
      fwd[name + "/scan"] = jax.jit(functools.partial(cj.run, model)).lower(
          *args[name]).compile()
    finally:
      xla_matmul.DENSE_TILE_BYTES = saved
    args[name + "/scan"] = args[name]
  t = interleaved_medians(_thunks(fwd, args), repeats=a.repeats)
  print(f"default LM forward, batch {a.lm_batch} x seq {seq} (cj.run vs "
        f"float jit, medians of {a.repeats} interleaved):")
  print(f"  float {t['float'] * 1e3:8.3f} ms")
  for name in [n for n in fwd if n != "float"]:
    r = t[name] / t["float"]
    rows.append(dict(kind="lm_forward", format=name, batch=a.lm_batch,
                     ms=t[name] * 1e3, float_ms=t["float"] * 1e3, ratio=r))
    print(f"  {name:10s} {t[name] * 1e3:8.3f} ms  ratio {r:5.2f}")
  # each distinct kernel shape once, as run dispatches it: x @ W
  shapes = sorted({tuple(x.shape) for p, x in leaves_with_paths(params)
                   if getattr(x, "ndim", 0) == 2 and "embed" not in p})
  m = a.lm_batch * seq
  mm = lambda tree, x: x @ tree["w"]  # noqa: E731
  print(f"kernel shapes (x ({m}, K) @ W (K, N), cj.run vs float jnp.dot):")
  for k, n in shapes:
    w = jax.random.normal(jax.random.key(k * 7 + n), (k, n)) / np.sqrt(k)
    x = jax.random.normal(jax.random.key(2), (m, k))
    fns = {"float": jax.jit(mm)}
    fargs = {"float": ({"w": w}, x)}
    for name, kw in LM_FORMATS.items():
      try:
        q = cj.quantize({"w": w}, default=lambda p, l: True, **kw)
      except cj.CompressionError as e:  # e.g. blocks that do not divide K
        print(f"  ({k}, {n}) {name}: skipped ({e})")
        continue
      fns[name] = jax.jit(functools.partial(cj.run, mm))
      fargs[name] = (q, x)
    t = interleaved_medians(_thunks(fns, fargs), repeats=a.repeats)
    line = ", ".join(f"{nm} {t[nm] / t['float']:4.2f}" for nm in t
                     if nm != "float")
    print(f"  ({k:4d}, {n:4d}) float {t['float'] * 1e3:7.3f} ms; ratios "
          f"{line}")
    for nm in t:
      if nm != "float":
        rows.append(dict(kind="lm_matmul", format=nm, m=m, k=k, n=n,
                         ms=t[nm] * 1e3, float_ms=t["float"] * 1e3,
                         ratio=t[nm] / t["float"]))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--sizes", default="4096,8192")
  ap.add_argument("--batches", default="1,16,256")
  ap.add_argument("--repeats", type=int, default=20)
  ap.add_argument("--seq", type=int, default=4096)
  ap.add_argument("--skip-attention", action="store_true")
  ap.add_argument("--json", default=None)
  ap.add_argument("--lm", action="store_true",
                  help="only the default LM's forward and kernel shapes")
  ap.add_argument("--lm-batch", type=int, default=16)
  a = ap.parse_args()
  a.sizes = [int(s) for s in a.sizes.split(",")]
  a.batches = [int(s) for s in a.batches.split(",")]
  backend = jax.default_backend()
  print(f"backend {backend}: {jax.devices()[0].device_kind}; jax "
        f"{jax.__version__}; medians of {a.repeats}")
  rows = []
  if a.lm:
    bench_lm(a, rows)
  elif backend == "cpu":
    bench_matmul_cpu(a, rows)
    print("attention: Pallas runs only in interpret mode on CPU; "
          "not measured")
  else:
    bench_matmul_accel(a, rows)
    if not a.skip_attention:
      bench_attention(a, rows)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
