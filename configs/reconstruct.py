"""Learned rounding / clipping (compressjax.train.reconstruct) on the default
LM against GPTQ and RTN: AdaRound, OmniQuant's learnable weight clipping and
both, per layer from one-shot calibration statistics.

    python -m experiments.compress_lm --config=configs/reconstruct.py \
        --workdir=runs/default
    ... --config.reconstruct.iters=5000
"""

from configs import default


def get_config():
  c = default.get_config()
  c.methods = ("float32,int3_g128,gptq_int3_g128,adaround_int3_g128,"
               "lwc_int3_g128,lwc_adaround_int3_g128,int2_g64,gptq_int2_g64,"
               "lwc_adaround_int2_g64")
  return c
