"""Format benchmark: quantize / dequantize throughput and error per format.

For each format, on an N x N float32 tensor (default 4096): the median time of a
jit-compiled quantize and of a dequantize (materialize), each as a ratio to a
plain float32 -> bfloat16 cast of the same tensor timed in the same run (higher
= slower than the cast), and the relative error ||W - W_hat|| / ||W|| on
Gaussian and on heavy-tailed (Student-t, 3 degrees of freedom) weights.

  python bench/formats.py [--size 4096] [--repeats 5] [--formats int4,mxfp4]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

import compressjax as cj
from compressjax.quantization import quantize_array
from timing import median_time

DEFAULT = ["int8", "int4", "int3", "int2", "ternary", "binary", "nf4",
           "fp8_e4m3", "fp8_e5m2", "fp6_e2m3", "fp6_e3m2", "fp4_e2m1",
           "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4",
           "mxint8", "nvfp4", "codebook3", "codebook4"]
GROUPED = {"int4": 128, "int3": 128, "int2": 64, "nf4": 64, "codebook3": 512,
           "codebook4": 512}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", type=int, default=4096)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--formats", default=",".join(DEFAULT))
  ap.add_argument("--json", default=None)
  a = ap.parse_args()
  n = a.size
  gauss = jax.random.normal(jax.random.key(0), (n, n))
  heavy = jax.random.t(jax.random.key(1), 3.0, (n, n))
  cast = median_time(jax.jit(lambda w: w.astype(jnp.bfloat16)), gauss,
               repeats=a.repeats)
  print(f"{n}x{n} float32; baseline f32->bf16 cast {cast * 1e3:.2f} ms "
        f"(median of {a.repeats}); {jax.devices()[0].platform}")
  head = (f"{'format':12s} {'bits/w':>7s} {'quant/cast':>11s} "
          f"{'dequant/cast':>13s} {'err gauss':>10s} {'err t(3)':>9s}")
  print(head)
  rows = []
  for name in a.formats.split(","):
    kw = dict(group_size=GROUPED.get(name))
    if name.startswith("int"):
      kw["bits"] = int(name[3:])
    else:
      kw["format"] = name
    quant = jax.jit(lambda w: quantize_array(w, **kw))
    deq = jax.jit(lambda q: q.materialize())
    tq = median_time(quant, gauss, repeats=a.repeats)
    q = quant(gauss)
    td = median_time(deq, q, repeats=a.repeats)
    err = {}
    for label, w in (("gauss", gauss), ("t3", heavy)):
      wq = deq(quant(w))
      err[label] = float(jnp.linalg.norm(w - wq) / jnp.linalg.norm(w))
    row = dict(format=name, bits_per_weight=q.bits_per_weight,
               quantize_ratio=tq / cast, dequantize_ratio=td / cast,
               rel_err_gauss=err["gauss"], rel_err_t3=err["t3"])
    rows.append(row)
    print(f"{name:12s} {q.bits_per_weight:7.3f} {tq / cast:11.1f} "
          f"{td / cast:13.1f} {err['gauss']:10.4f} {err['t3']:9.4f}",
          flush=True)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(dict(size=n, cast_seconds=cast, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
