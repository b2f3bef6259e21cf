"""PyTorch reference timings of GPTQ, SparseGPT and Wanda on one layer, for
bench/calibrated.py's speed ratios. Timing only: written here from the papers'
algorithms, in the structure of the authors' released code (column loop with
rank-1 updates inside blocks of 128 and one lazy matmul per block; per-block
sort for SparseGPT's unstructured mask, topk per run of M for N:M; Wanda's
per-output sort, or topk per run of M):

  GPTQ       Frantar et al. 2022, Alg. 1 (H^-1 by cholesky_inverse, then its
             upper Cholesky factor; group scales at each group start)
  SparseGPT  Frantar & Alistarh 2023, Alg. 1 (adaptive mask per block of 128)
  Wanda      Sun et al. 2023, Sec. 3 (|W| * ||X||, per output)

Runs in a separate interpreter that has torch (never the project's venv):

  /tmp/torchvenv/bin/python bench/reference_torch.py --size 4096 --tokens 4096
      [--threads 1] [--layers 4]

prints one JSON line {algorithm: wall seconds for --layers calls,
algorithm_cpu: process CPU seconds of the same}. The inputs are
drawn like bench/calibrated.py's (same distribution, not the same numbers: the
cost does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _hinv_upper(h, damp):
  k = h.shape[0]
  dead = torch.diag(h) == 0
  h[dead, dead] = 1
  h += damp * torch.mean(torch.diag(h)) * torch.eye(k)
  h = torch.cholesky_inverse(torch.linalg.cholesky(h))
  return torch.linalg.cholesky(h, upper=True), dead


def gptq(w, h, bits=4, groupsize=128, blocksize=128, damp=0.01):
  """w (out, in) as torch Linear; symmetric int grid, per-group scales."""
  w = w.clone()
  h = h.clone()
  rows, cols = w.shape
  hinv, dead = _hinv_upper(h, damp)
  w[:, dead] = 0
  maxq = 2 ** (bits - 1) - 1
  q = torch.zeros_like(w)
  scale = None
  for i1 in range(0, cols, blocksize):
    i2 = min(i1 + blocksize, cols)
    w1 = w[:, i1:i2].clone()
    q1 = torch.zeros_like(w1)
    err1 = torch.zeros_like(w1)
    h1 = hinv[i1:i2, i1:i2]
    for i in range(i2 - i1):
      col = w1[:, i]
      d = h1[i, i]
      if (i1 + i) % groupsize == 0:
        g = w1[:, i:i + groupsize]
        scale = g.abs().amax(1).clamp(min=1e-12) / maxq
      qc = torch.clamp(torch.round(col / scale), -maxq - 1, maxq) * scale
      q1[:, i] = qc
      e = (col - qc) / d
      w1[:, i:] -= e.unsqueeze(1).matmul(h1[i, i:].unsqueeze(0))
      err1[:, i] = e
    q[:, i1:i2] = q1
    w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
  return q


def sparsegpt(w, h, sparsity=0.5, prunen=0, prunem=0, blocksize=128,
              damp=0.01):
  w = w.clone()
  h = h.clone()
  rows, cols = w.shape
  hinv, dead = _hinv_upper(h, damp)
  w[:, dead] = 0
  for i1 in range(0, cols, blocksize):
    i2 = min(i1 + blocksize, cols)
    count = i2 - i1
    w1 = w[:, i1:i2].clone()
    q1 = torch.zeros_like(w1)
    err1 = torch.zeros_like(w1)
    h1 = hinv[i1:i2, i1:i2]
    if prunen == 0:
      tmp = w1 ** 2 / (torch.diag(h1).reshape((1, -1))) ** 2
      thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
      mask1 = tmp <= thresh
    else:
      mask1 = torch.zeros_like(w1, dtype=torch.bool)
    for i in range(count):
      col = w1[:, i]
      d = h1[i, i]
      if prunen != 0 and i % prunem == 0:
        tmp = (w1[:, i:i + prunem] ** 2
               / (torch.diag(h1)[i:i + prunem].reshape((1, -1))) ** 2)
        mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1,
                                         largest=False)[1], True)
      qc = col.clone()
      qc[mask1[:, i]] = 0
      q1[:, i] = qc
      e = (col - qc) / d
      w1[:, i:] -= e.unsqueeze(1).matmul(h1[i, i:].unsqueeze(0))
      err1[:, i] = e
    w[:, i1:i2] = q1
    w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
  return w


def wanda(w, sq_norm, sparsity=0.5, prune_n=0, prune_m=0):
  w = w.clone()
  metric = torch.abs(w) * torch.sqrt(sq_norm.reshape((1, -1)))
  mask = torch.zeros_like(metric) == 1
  if prune_n != 0:
    for ii in range(metric.shape[1]):
      if ii % prune_m == 0:
        tmp = metric[:, ii:ii + prune_m]
        mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1,
                                         largest=False)[1], True)
  else:
    idx = torch.sort(metric, dim=-1, stable=True)[1][
        :, :int(metric.shape[1] * sparsity)]
    mask.scatter_(1, idx, True)
  w[mask] = 0
  return w


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", type=int, default=4096)
  ap.add_argument("--tokens", type=int, default=4096)
  ap.add_argument("--threads", type=int, default=1)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--only", default="")
  a = ap.parse_args()
  torch.set_num_threads(a.threads)
  torch.manual_seed(0)
  k = a.size
  mix = torch.randn(k, k) / k ** 0.5
  x = torch.randn(a.tokens, k) @ mix + 0.1 * torch.randn(a.tokens, k)
  h = 2 * x.T @ x / a.tokens
  sq = (x * x).sum(0)
  w = torch.randn(k, k) * 0.02  # (out, in)
  runs = {
      "gptq_int4_g128": lambda: gptq(w, h),
      "sparsegpt_50": lambda: sparsegpt(w, h, 0.5),
      "sparsegpt_2_4": lambda: sparsegpt(w, h, 0, 2, 4),
      "wanda_50": lambda: wanda(w, sq, 0.5),
      "wanda_2_4": lambda: wanda(w, sq, 0, 2, 4),
  }
  out = {}
  for name, fn in runs.items():
    if a.only and name not in a.only.split(","):
      continue
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(a.layers):
      fn()
    out[name] = round(time.perf_counter() - t0, 3)
    # CPU seconds: the comparable figure on a machine shared with others
    out[name + "_cpu"] = round(time.process_time() - c0, 3)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
