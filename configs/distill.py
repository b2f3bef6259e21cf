"""Distillation-recovered 2:4 of the default LM (experiments/train_lm.py):
magnitude 2:4, the float model is the teacher, 1000 fine-tuning steps.

    python -m experiments.train_lm --config=configs/distill.py --workdir=runs/kd
"""

from configs import default


def get_config():
  c = default.get_config()
  c.finetune.steps = 1000
  c.methods = "float32,nm_2_4,kd_2_4"
  return c
