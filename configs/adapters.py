"""Adapters on compressed bases (compressjax.train.adapters) on the default
LM: float LoRA, QLoRA (NF4 + double quantization), and B = 0 vs LoftQ
starts on int2 / int3 bases, each fine-tuned with the training rows' budget
(config.finetune) at config.adapters.learning_rate. Ranks are in the names.

    python -m experiments.train_lm --config=configs/adapters.py \
        --workdir=runs/default
    ... --config.finetune.steps=1000 --config.methods=float32,qlora_nf4_r16
"""

from configs import default


def get_config():
  c = default.get_config()
  c.methods = ("float32,lora_r8,qlora_nf4_r8,nf4,int2_g64,lora_int2_g64_r8,"
               "loftq_int2_g64_r8,int3_g128,lora_int3_g128_r8,"
               "loftq_int3_g128_r8")
  return c
