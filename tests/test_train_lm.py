"""The entry points (experiments/compress_lm.py, experiments/train_lm.py):
thin absl mains over the harness. The training rows themselves run in the
smoke experiment (tests/test_experiment.py); here: the recipe configs name
training rows that parse, and one real command-line run pins the XLA flags
and writes the results files."""

import json
import os
import subprocess
import sys

import pytest

from configs import default, distill, qat, smoke, sparse_training
from experiments import harness, lm_task, rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("module,trained", [
    (qat, ["qat_int4_g128"]), (distill, ["kd_2_4"]),
    (sparse_training, ["rigl_90"])])
def test_recipe_configs_name_training_rows(module, trained):
  c = module.get_config()
  parsed = rows.parse(c.methods, c)
  assert [r.name for r in parsed if "training" in r.needs] == trained
  assert parsed[0].name == "float32"
  assert c.finetune.steps > default.get_config().finetune.steps
  # the description states the longer schedule the config sets
  assert f"{c.finetune.steps} steps" in parsed[-1].description


def test_command_line_run(tmp_path):
  # compilation is all the time here: XLA's optimizations off
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
             JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  cmd = [sys.executable, "-m", "experiments.compress_lm",
         "--config=configs/smoke.py", f"--workdir={tmp_path}",
         "--config.methods=float32", "--config.train.steps=2",
         "--config.eval.max_batches=1"]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  with open(tmp_path / "results.json") as f:
    assert [r["method"] for r in json.load(f)] == ["float32"]
  md = (tmp_path / "results.md").read_text()
  assert "| float32 |" in md and md in out.stdout
  for flag in harness.PINNED_XLA_FLAGS:
    assert flag in md  # the environment line records the pinned flags
  # a bad row name fails before any training, naming the row kinds (in
  # process: the entry point is lm_task.run behind absl)
  bad_dir = tmp_path / "bad"
  c = smoke.get_config()
  c.methods = "float32,int4_g7x"
  with pytest.raises(ValueError, match="unknown method 'int4_g7x'"):
    lm_task.run(c, str(bad_dir), log=lambda s: None)
  assert not (bad_dir / "baseline").exists()
