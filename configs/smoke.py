"""A tiny version of the default experiment, for tests (seconds on a CPU).

Every row kind of the default table, at tiny size: the model's kernels have
32 and 64 inputs, so the rows that state a group use 32 (`int4_g32`,
`gptq_int3_g32_seq`, ...) and so do the settings names leave to the config.
"""

import re

from configs import default


# Default rows the tiny run leaves out: their kinds (learned rounding, QLoRA,
# LoftQ) are built at tiny size, with fewer steps, by
# tests/test_experiment_training_rows.py and tests/train/; here they would add
# ~25 s of compilation to the suite.
TESTED_APART = ("lwc_adaround_int3_g32", "qlora_nf4_r8", "loftq_int2_g32_r8")


def tiny_methods(methods: str) -> str:
  """The default rows with their groups of 64/128 inputs made 32 (less the
  rows TESTED_APART)."""
  tiny = re.sub(r"_g(?:64|128)(?=\D|$)", "_g32", methods).split(",")
  return ",".join(m for m in tiny if m not in TESTED_APART)


def get_config():
  c = default.get_config()
  c.data.max_bytes = 200_000
  c.data.max_val_bytes = 40_000
  c.data.seq_len = 32
  c.model.d_model = 32
  c.model.n_layers = 2
  c.model.n_heads = 2
  c.model.d_mlp = 64
  # compilation, not steps, is the cost at this size: train long enough for
  # orderings (int2 well above int4, ...) to show
  c.train.steps = 800
  c.train.batch_size = 16
  c.train.learning_rate = 1e-2
  c.train.warmup = 20
  c.train.log_every = 200
  c.eval.batch_size = 16
  c.eval.max_batches = 4
  c.quant.group_size = 32
  c.quant.nf4_group_size = 32
  c.calib.batches = 4
  c.calib.batch_size = 8
  c.finetune.steps = 30
  c.finetune.warmup = 3
  c.finetune.update_every = 5
  c.finetune.prune_every = 5
  c.finetune.log_every = 10
  c.reconstruct.iters = 100        # compilation dominates at this size
  c.methods = tiny_methods(c.methods)
  return c
