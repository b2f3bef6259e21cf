"""Dynamic sparse training of the default LM (experiments/train_lm.py):
RigL (or set / gmp) at 90%, from the float model.

    python -m experiments.train_lm --config=configs/sparse_training.py \
        --workdir=runs/rigl --config.recipe.method=set
"""

import ml_collections

from configs import default


def get_config():
  c = default.get_config()
  c.finetune.steps = 1000
  c.finetune.update_every = 100   # the paper's settings for long runs
  c.finetune.drop_fraction = 0.3
  c.recipe = ml_collections.ConfigDict()
  c.recipe.method = "rigl"   # rigl | set | gmp
  c.recipe.sparsity = 0.9
  return c
