"""Dynamic sparse training of the default LM (experiments/train_lm.py):
RigL at 90% (or set_90 / gmp_90) from the float model, 1000 steps.

    python -m experiments.train_lm --config=configs/sparse_training.py \
        --workdir=runs/rigl --config.methods=float32,set_90
"""

from configs import default


def get_config():
  c = default.get_config()
  c.finetune.steps = 1000
  c.finetune.update_every = 100   # the paper's settings for long runs
  c.finetune.drop_fraction = 0.3
  c.methods = "float32,rigl_90"
  return c
