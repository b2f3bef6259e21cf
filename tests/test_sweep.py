"""The budget sweep (experiments/sweep.py) end to end on a tiny LM."""

import json
import os

import pytest

from configs import smoke
from configs import sweep as sweep_config
from experiments import sweep


def _config():
  c = sweep_config.get_config()
  sm = smoke.get_config()
  for k in ("data", "model", "train", "eval"):
    c[k] = sm[k]
  c.model.n_layers = 1
  c.model.d_mlp = c.model.d_model  # two kernel shapes: fewer compilations
  c.train.steps = 5
  c.calib.batches, c.calib.batch_size = 2, 8
  c.eval.max_batches = 2
  s = c.sweep
  s.sensitivity.batches, s.sensitivity.batch_size = 1, 8
  s.proxy = "output"  # from the captured Gram (Fisher: tests/allocate)
  s.families = "mixed,sparsity,lowrank"  # mixed: the quant family + mixtures
  s.mixed.candidates = "int4_c,int8_c"
  s.mixed.mixtures = "magnitude50+int8_c"
  s.mixed.bits = "5.5,7"
  s.mixed.uniform = "int4_c,magnitude50+int8_c"
  s.sparsity.method = "magnitude"
  s.sparsity.targets = "0.6"
  s.sparsity.levels = "0.8"
  s.sparsity.nonuniform = "owl"
  s.lowrank.method = "svd"
  s.lowrank.targets = "0.5"
  s.lowrank.levels = "0.25"
  return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sweep"))
  c = _config()
  logs = [], []
  first = sweep.run_sweep(c, workdir, log=logs[0].append)
  second = sweep.run_sweep(c, workdir, log=logs[1].append)
  return workdir, first, second, logs


def test_points_fit_their_budgets(runs):
  _, out, _, _ = runs
  recs = out["records"]
  methods = {(r["family"], r["method"].split(" @ ")[0]) for r in recs}
  assert methods >= {("mixed", "allocated (milp)"), ("mixed", "uniform"),
                     ("mixed", "uniform (head int8_c)"),
                     ("sparsity", "uniform"), ("sparsity", "owl"),
                     ("sparsity", "allocated (milp)"),
                     ("lowrank", "uniform"), ("lowrank", "energy"),
                     ("lowrank", "allocated (milp)")}
  for r in recs:
    assert 1.0 < r["value"] < 256.0
    if "planned_bytes" in r:  # the compressed tree stores what was planned
      assert r["layer_bytes"] == r["planned_bytes"]
    if r["method"].startswith("allocated"):
      assert r["layer_bytes"] <= r["budget_bytes"]
      if " @ " not in r["method"] and r["family"] == "mixed":
        assert r["bits_per_weight"] <= r["target"] + 1e-9
  # allocated at a uniform point's true size is no bigger than it
  by = {(r["family"], r["method"], r["target"]): r for r in recs}
  for (fam, m, t), r in by.items():
    if m.startswith("uniform") and fam != "mixed":
      a = by[(fam, "allocated (milp)", t)]
      assert a["layer_bytes"] <= r["layer_bytes"]
  for s in out["solvers"]:
    assert s["milp"] <= s["greedy"] + 1e-9 * abs(s["greedy"])
  mixes = [r for r in recs if r["method"] == "uniform"
           and r["family"] == "mixed" and "magnitude50" in str(r["choice"])]
  assert len(mixes) == 1 and mixes[0]["bits_per_weight"] < 32
  owl = [r for r in recs if r["method"] == "owl"][0]
  assert owl["weighted_sparsity"] == pytest.approx(0.6, abs=1e-9)


def test_outputs_and_cache(runs):
  workdir, first, second, logs = runs
  for f in ("sweep.json", "sweep.md", "pareto.png"):
    assert os.path.getsize(os.path.join(workdir, f)) > 0
  assert any(n.startswith("events") for _, _, fs in os.walk(
      os.path.join(workdir, "tb")) for n in fs)
  with open(os.path.join(workdir, "sweep.json")) as f:
    assert len(json.load(f)["records"]) == len(first["records"])
  # a first-run cache hit is a plan found before at another budget
  seen = set()
  for r in first["records"]:
    key = (r["family"], json.dumps(r.get("choice"), sort_keys=True))
    assert r["cached"] == (key in seen and "choice" in r)
    seen.add(key)
  # the rerun reuses every point and table and never recalibrates
  assert all(r["cached"] for r in second["records"])
  assert [r["value"] for r in first["records"]] == [
      r["value"] for r in second["records"]]
  assert not any("calibration:" in line for line in logs[1])
  assert any("calibration:" in line for line in logs[0])


def test_helpers_and_bad_config(tmp_path):
  assert sweep.quant_setting("int3_g128") == dict(bits=3, format=None,
                                                  group_size=128)
  assert sweep.quant_setting("int4_c") == dict(bits=4, format=None,
                                               group_size=None)
  assert sweep.quant_setting("nf4_g64") == dict(format="nf4", group_size=64)
  assert sweep.pareto_front([(1, 5), (2, 3), (2, 4), (3, 3.5), (4, 1)]) == [
      0, 1, 4]
  c = _config()
  c.sweep.families = "quant,pruning"
  with pytest.raises(ValueError, match="unknown families.*pruning"):
    sweep.run_sweep(c, str(tmp_path))
