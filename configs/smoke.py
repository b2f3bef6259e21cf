"""A tiny version of the default experiment, for tests (seconds on a CPU).

Same rows as the default; the model is small, so the quantization group is
32 (it must divide every kernel's in_features: 32 and 64).
"""

from configs import default


def get_config():
  c = default.get_config()
  c.data.max_bytes = 200_000
  c.data.max_val_bytes = 40_000
  c.data.seq_len = 32
  c.model.d_model = 32
  c.model.n_layers = 2
  c.model.n_heads = 2
  c.model.d_mlp = 64
  c.train.steps = 100
  c.train.batch_size = 8
  c.train.learning_rate = 1e-2
  c.train.warmup = 5
  c.train.log_every = 25
  c.eval.batch_size = 16
  c.eval.max_batches = 4
  c.quant.group_size = 32
  c.quant.small_group_size = 32
  c.finetune.steps = 4
  c.finetune.warmup = 1
  c.finetune.update_every = 1
  c.finetune.prune_every = 1
  c.finetune.log_every = 2
  return c
