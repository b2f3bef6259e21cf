r"""Do the table's orderings survive other seeds? Rows x baseline seeds x
calibration draws, on the default LM.

    python -m experiments.seed_sweep --workdir=runs/seeds \
        --seeds=0,1,2 --calib_seeds=1,2,3 \
        --config.methods=int4_g128,gptq_int4_g128,awq_int4_g128,\
int3_g128,gptq_int3_g128,awq_int3_g128

Every baseline seed trains (and caches) its own float model (config.seed:
init and data order); each calibration seed draws other calibration windows
(config.calib.seed). Rows that use no calibration run once per baseline.
Writes sweep.json (one record per row, seed and calibration seed) and
sweep.md: one line per (seed, calibration seed), and for every calibrated
row named `<algorithm>_int<b>_g<g>` whether it is <= the data-free row
`int<b>_g<g>` (when both are in config.methods).
"""

from __future__ import annotations

import json
import os
import re

from absl import app
from absl import flags

from experiments import harness
from experiments import lm_task
from experiments import rows as rows_lib

_SEEDS = flags.DEFINE_string("seeds", "0,1,2", "Baseline seeds (config.seed).")
_CALIB = flags.DEFINE_string("calib_seeds", "1,2,3",
                             "Calibration seeds (config.calib.seed).")


def orderings(names) -> list[tuple[str, str]]:
  """(calibrated, data-free) pairs: awq_int4_g128 vs int4_g128, ..."""
  out = []
  for n in names:
    m = re.fullmatch(r"\w+?_(int\d+_g\d+)", n)
    if m and m[1] in names and n != m[1]:
      out.append((n, m[1]))
  return out


def sweep(c, workdir: str, seeds, calib_seeds, log=print) -> list[dict]:
  rows = rows_lib.parse(c.methods, c)
  calibrated = [r for r in rows if r.needs & {"stats", "calib"}]
  plain = [r for r in rows if r not in calibrated]
  records = []
  for seed in seeds:
    c.seed = seed
    task = lm_task.task(c, workdir, log)
    ctx = harness.Context(c, task, workdir, log)
    fixed = {r["method"]: r["value"] for r in harness.run_rows(
        ctx, plain, save=False)}
    for cs in calib_seeds:
      c.calib.seed = cs
      ctx = harness.Context(c, task, workdir, log)
      values = dict(fixed, **{r["method"]: r["value"] for r in
                              harness.run_rows(ctx, calibrated, save=False)})
      records += [dict(seed=seed, calib_seed=cs, method=r.name,
                       value=values[r.name]) for r in rows]
  return records


def write(workdir: str, records: list[dict], names) -> str:
  pairs = orderings(names)
  keys = sorted({(r["seed"], r["calib_seed"]) for r in records})
  val = {(r["seed"], r["calib_seed"], r["method"]): r["value"]
         for r in records}
  head = ["seed", "calib"] + list(names) + [f"{a} <= {b}" for a, b in pairs]
  lines = ["| " + " | ".join(head) + " |",
           "|" + "---:|" * len(head)]
  holds = {p: 0 for p in pairs}
  for s, cs in keys:
    cells = [str(s), str(cs)] + [f"{val[s, cs, n]:.4f}" for n in names]
    for a, b in pairs:
      ok = val[s, cs, a] <= val[s, cs, b]
      holds[a, b] += ok
      cells.append("yes" if ok else "**no**")
    lines.append("| " + " | ".join(cells) + " |")
  lines += [""] + [f"- {a} <= {b}: {holds[a, b]}/{len(keys)}"
                   for a, b in pairs]
  text = "\n".join(lines) + "\n"
  with open(os.path.join(workdir, "sweep.json"), "w") as f:
    json.dump(records, f, indent=2)
  with open(os.path.join(workdir, "sweep.md"), "w") as f:
    f.write(text)
  return text


def main(argv):
  config, workdir = harness.setup_main(argv)
  seeds = [int(s) for s in _SEEDS.value.split(",")]
  calib = [int(s) for s in _CALIB.value.split(",")]
  names = [n.strip() for n in config.methods.split(",") if n.strip()]
  os.makedirs(workdir, exist_ok=True)
  print(write(workdir, sweep(config, workdir, seeds, calib), names))


if __name__ == "__main__":
  harness.define_flags(lm_task.DEFAULT_CONFIG, "runs/seed_sweep")
  app.run(main)
