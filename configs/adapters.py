"""Adapters on compressed bases (compressjax.train.adapters) on the default
LM: float LoRA, QLoRA (NF4 + double quantization), and B = 0 vs LoftQ
starts on int2 / int3 bases, each fine-tuned with the training rows' recipe.

    python -m experiments.train_lm --config=configs/adapters.py \
        --workdir=runs/adapters
    ... --config.adapters.rank=16 --config.finetune.steps=1000
"""

from configs import default


def get_config():
  c = default.get_config()
  c.methods = ("float32,lora_r8,qlora_nf4,lora_int2_g64,loftq_int2_g64,"
               "lora_int3_g128,loftq_int3_g128")
  return c
