"""QAT of the default LM (experiments/train_lm.py): LSQ int4 g128, head int8,
1000 fine-tuning steps.

    python -m experiments.train_lm --config=configs/qat.py --workdir=runs/qat
    ... --config.methods=float32,qat_ternary
"""

from configs import default


def get_config():
  c = default.get_config()
  c.finetune.steps = 1000
  c.methods = "float32,qat_int4_g128"
  return c
