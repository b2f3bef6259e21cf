"""Learned rounding / clipping (compressjax.train.reconstruct) on the default
LM against GPTQ and RTN: AdaRound, OmniQuant's learnable weight clipping and
both, per layer from one-shot calibration statistics, from RTN or (prefix
`gptq_`) from GPTQ's result.

    python -m experiments.compress_lm --config=configs/reconstruct.py \
        --workdir=runs/default
    ... --config.reconstruct.iters=5000

Measured (val ppl, float 5.322; 2000 steps per phase; calibration seed 1,
then the mean over calibration seeds 1-5; seconds on 2 loaded cores):
  int3 g128: RTN 5.812; GPTQ 5.402 (2 s), mean 5.411; AdaRound 5.413 (14-60
  s), mean 5.405; LWC 5.751; LWC + AdaRound 5.388 (37-80 s), mean 5.373,
  below GPTQ on every draw (paired -0.038 +- 0.008 s.e.). From GPTQ's
  result: AdaRound at its codes 5.424, LWC + AdaRound 5.392. 5000 / 10000
  steps: LWC + AdaRound 5.361 / 5.389 (not monotone: no gain shown).
  Sequential (calibrate.sequential) LWC + AdaRound 5.392 (102 s); block
  objective (reconstruct_blocks, 300 steps): AdaRound from GPTQ 5.432 (149
  s), LWC + AdaRound from RTN 5.447 (312 s).
  int2 g64: RTN 8.652, GPTQ 5.904, AdaRound 5.697, LWC + AdaRound 5.612
  (0.65 x RTN; its gap to float is 9% of RTN's).
"""

from configs import default


def get_config():
  c = default.get_config()
  c.methods = ("float32,int3_g128,gptq_int3_g128,adaround_int3_g128,"
               "lwc_int3_g128,lwc_adaround_int3_g128,"
               "gptq_lwc_adaround_int3_g128,int2_g64,gptq_int2_g64,"
               "lwc_adaround_int2_g64")
  return c
