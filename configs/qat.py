"""QAT of the default LM (experiments/train_lm.py): LSQ int4 g128, head int8.

    python -m experiments.train_lm --config=configs/qat.py --workdir=runs/qat
    ... --config.recipe.format=ternary --config.recipe.group_size=0
"""

import ml_collections

from configs import default


def get_config():
  c = default.get_config()
  c.finetune.steps = 1000
  c.recipe = ml_collections.ConfigDict()
  c.recipe.method = "qat"
  c.recipe.bits = 4
  c.recipe.format = ""       # "" = integer of `bits`; or ternary, nf4, ...
  c.recipe.group_size = 128  # 0 = per channel
  return c
