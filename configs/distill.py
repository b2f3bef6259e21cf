"""Distillation-recovered 2:4 of the default LM (experiments/train_lm.py):
the student is a default-table row, the float model is the teacher.

    python -m experiments.train_lm --config=configs/distill.py --workdir=runs/kd
"""

import ml_collections

from configs import default


def get_config():
  c = default.get_config()
  c.finetune.steps = 1000
  c.recipe = ml_collections.ConfigDict()
  c.recipe.method = "distill"
  c.recipe.student = "nm_2_4"  # any non-calibrated row of METHODS
  return c
