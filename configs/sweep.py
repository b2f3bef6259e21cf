"""Budget sweep on the default byte-level LM (experiments/sweep.py).

    python -m experiments.sweep --workdir=/tmp/cj_sweep
    python -m experiments.sweep --workdir=/tmp/cj_sweep \
        --config.sweep.families=quant --config.sweep.quant.bits=2.5,3,3.5

The model, data, training, evaluation and calibration are the default
experiment's (configs/default.py), so the float baseline is shared with it
when both use one workdir. Lists are comma-separated strings.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = default.get_config()
  s = c.sweep = ml_collections.ConfigDict()
  s.families = "quant,sparsity,lowrank"
  s.proxy = "fisher"             # sensitivity the solver minimizes
  s.solvers = "milp,greedy"      # exact first; greedy only when it differs
  s.ground_truth = False         # exact per-layer loss changes + proxy rho
  s.materialize = True           # evaluate the dequantized weights (1 jit)
  s.tensorboard = True           # HParams in <workdir>/tb

  # Fisher / Hutchinson / exact-loss batches (training windows)
  s.sensitivity = ml_collections.ConfigDict()
  s.sensitivity.batches = 2
  s.sensitivity.batch_size = 16
  s.sensitivity.seed = 7
  s.sensitivity.trace_samples = 16  # Hutchinson, with ground_truth only

  # Bits: RTN (or GPTQ) candidates per layer; 8 budgets of average bits per
  # weight over every kernel (head included: the solver decides its bits).
  s.quant = ml_collections.ConfigDict()
  s.quant.method = "rtn"         # rtn | gptq
  s.quant.candidates = ("int2_c,int2_g128,int2_g64,int2_g32,int3_c,"
                        "int3_g128,int3_g64,int4_c,int4_g128,int4_g64,int8_c")
  s.quant.bits = "2.25,2.5,2.75,3.0,3.25,3.5,4.0,4.5"
  s.quant.uniform = "int2_g64,int2_g32,int3_g128,int4_g128"
  s.quant.head = "int8_c"        # also uniform with the head at this setting
  s.quant.match_uniform = True   # allocate at each uniform row's true size

  # Mixed (opt-in: add "mixed" to families): bits and sparse+quant
  # mixtures per layer, under the same kind of budgets.
  s.mixed = ml_collections.ConfigDict()
  s.mixed.method = "rtn"
  s.mixed.candidates = s.quant.candidates
  s.mixed.mixtures = "wanda50+int4_g64,wanda50+int8_c,nm24+int4_c"
  s.mixed.bits = "2.5,3.0,3.5,4.0"
  s.mixed.uniform = "wanda50+int4_g64,nm24+int4_c"
  s.mixed.head = "int8_c"
  s.mixed.match_uniform = True

  # Sparsity: unstructured, per layer, blocks only (as SparseGPT / Wanda).
  s.sparsity = ml_collections.ConfigDict()
  s.sparsity.method = "wanda"    # wanda | sparsegpt | magnitude
  s.sparsity.targets = "0.5,0.6,0.7"
  s.sparsity.levels = "0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"
  s.sparsity.nonuniform = "owl,erk"
  s.sparsity.owl_m = 5.0
  s.sparsity.owl_lam = 0.08
  s.sparsity.prune_head = False

  # Low rank: parameter ratios of each kernel (rank = ratio mn / (m + n)).
  s.lowrank = ml_collections.ConfigDict()
  s.lowrank.method = "svd_llm"   # svd_llm | svd
  s.lowrank.targets = "0.25,0.5"
  s.lowrank.levels = "0.125,0.25,0.5,0.75,1.0"
  return c
