"""Solver scaling: exact MILP and DP vs greedy on LLM-sized allocation
problems (run as `python bench/allocate.py`).

Instances mimic a decoder's linear layers (7 per block: q, k, v, o, gate, up,
down) with the bytes of RTN candidates at 2/3/4/8 bits and groups of 32/64/
128/per channel (fp32 scales), and sensitivities s = n * a_l * 4^-bits *
(1 + 0.3 * noise), a_l log-uniform over three decades (a per-layer scale, as
Hessian traces spread). For each size: seconds per solver and the greedy
objective's excess over the exact one.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from compressjax.allocate import solve_dp, solve_greedy, solve_milp

SETTINGS = [(b, g) for b in (2, 3, 4, 8) for g in (32, 64, 128, None)]


def instance(blocks: int, d: int, seed: int):
  rng = np.random.default_rng(seed)
  shapes = [(d, d)] * 4 + [(d, 8 * d // 3), (d, 8 * d // 3), (8 * d // 3, d)]
  costs, scores, weights = [], [], 0
  for _ in range(blocks):
    for k, n in shapes:
      a = 10 ** rng.uniform(-3, 0)
      c, s = [], []
      for bits, g in SETTINGS:
        groups = 1 if g is None else k // g
        c.append(k * n * bits // 8 + 4 * groups * n)
        s.append(k * n * a * 4.0 ** -bits * (1 + 0.3 * rng.random()))
      costs.append(np.array(c, np.int64))
      scores.append(np.array(s))
      weights += k * n
  return costs, scores, weights


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--sizes", default="4x512,32x1024,32x4096",
                  help="blocks x d_model, comma separated")
  ap.add_argument("--bits", type=float, default=3.0,
                  help="budget: average bits per weight")
  a = ap.parse_args()
  print(f"{'instance':>10s} {'layers':>6s} {'vars':>6s} {'milp s':>8s} "
        f"{'dp s':>8s} {'greedy s':>8s} {'dp exact':>8s} "
        f"{'greedy excess':>14s}")
  for spec in a.sizes.split(","):
    blocks, d = map(int, spec.split("x"))
    costs, scores, weights = instance(blocks, d, 0)
    budget = int(a.bits / 8 * weights)
    obj = lambda ch: float(sum(s[k] for s, k in zip(scores, ch)))
    t0 = time.perf_counter(); m = solve_milp(costs, scores, budget)
    tm = time.perf_counter() - t0
    t0 = time.perf_counter(); d_, exact = solve_dp(costs, scores, budget)
    td = time.perf_counter() - t0
    t0 = time.perf_counter(); g = solve_greedy(costs, scores, budget)
    tg = time.perf_counter() - t0
    print(f"{spec:>10s} {len(costs):6d} {len(costs) * len(SETTINGS):6d} "
          f"{tm:8.3f} {td:8.3f} {tg:8.3f} {str(exact):>8s} "
          f"{(obj(g) - obj(m)) / obj(m):14.2e}")
    assert abs(obj(d_) - obj(m)) <= 1e-6 * obj(m) or not exact


if __name__ == "__main__":
  main()
