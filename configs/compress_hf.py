"""compress_hf: the compression table on a Hugging Face checkpoint.

    python -m experiments.compress_hf --model_dir=path/to/hf_dir
    python -m experiments.compress_hf --model_dir=DIR \
        --config.data.eval_text=wiki.test.txt --config.eval.seqlen=2048

Any directory `compressjax.models.hub.load_pretrained` reads (llama/mistral/
qwen2, gpt2, bert, vit families). Row names are the default experiment's
(experiments/rows.py); group sizes are in the names, so a model whose
kernels' inputs are not multiples of 128 needs other names (the tests use
_g16). Text defaults to the pinned stdlib snapshot (validation files for
evaluation, training files for calibration): pass real text files for
WikiText-style numbers.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model_dir = ""                 # also --model_dir
  c.dtype = "float32"              # weights as loaded: float32 | bfloat16 ...

  # Text: files, or "" for the pinned stdlib snapshot (the default
  # experiment's split: validation files evaluate, training files calibrate).
  c.data = ml_collections.ConfigDict()
  c.data.eval_text = ""
  c.data.calib_text = ""
  c.data.source = "snapshot"
  c.data.max_bytes = 400_000       # stdlib training text read for calibration
  c.data.max_val_bytes = 100_000
  c.data.val_files = default.get_config().data.val_files

  c.eval = ml_collections.ConfigDict()
  # decoders: perplexity over non-overlapping windows (GPTQ's protocol)
  c.eval.seqlen = 256
  c.eval.batch_size = 8
  c.eval.max_windows = 32          # 0: every window of the text
  c.eval.zeroshot = "python_syntax"  # built-in task or a JSONL file; "": off
  c.eval.zeroshot_items = 0        # first N items (0: all)
  c.eval.zeroshot_batch = 32
  c.eval.zeroshot_pad = 16         # requests padded to a multiple of this
  # encoders: BERT sentence embeddings of the first N lines of eval text vs
  # the float model's; ViT logits on N seeded random images vs float
  c.eval.samples = 64

  # Calibration (logged in every calibrated row): decoders draw `batches x
  # batch_size` random segments of `seqlen` tokens of calib_text (no
  # padding); BERT takes as many lines, length-bucketed and padded; ViT
  # seeded N(0, 1) pixels (no image data is shipped).
  c.calib = ml_collections.ConfigDict()
  c.calib.batches = 4
  c.calib.batch_size = 16
  c.calib.seqlen = 256
  c.calib.seed = 1

  # Settings row names do not state (see configs/default.py).
  c.quant = ml_collections.ConfigDict()
  c.quant.head_bits = 32           # >= 16: LM head / classifier stay float
  c.quant.group_size = 128
  c.quant.gptq_scale_dtype = "float16"  # GPTQ rows: exact GPTQ export
  c.quant.nf4_group_size = 64
  c.quant.smooth_alpha = 0.5
  c.sparsity = ml_collections.ConfigDict()
  c.sparsity.prune_head = False
  c.lowrank = ml_collections.ConfigDict()
  c.lowrank.rank_ratio = 0.5
  c.lowrank.residual_rank_ratio = 0.125

  # The row whose tree is written in the GPTQ layout (models.gptq_export) to
  # <workdir>/gptq; "" writes none.
  c.export = ml_collections.ConfigDict()
  c.export.gptq = "gptq_int4_g128"

  c.methods = ("float32,int8,int4_g128,gptq_int4_g128,awq_int4_g128,"
               "sparsegpt_50,wanda_50,wanda_2_4,nm_2_4,sparsegpt_2_4,lowrank,"
               "svd_llm")
  return c
