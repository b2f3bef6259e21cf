"""KV-cache compression experiment (experiments/kv_lm.py).

    python -m experiments.kv_lm --workdir=/tmp/cj_kv
    python -m experiments.kv_lm --workdir=/tmp/cj_kv \
        --config.rows=float,int8,kivi2_r32,h2o_25

Two models: the default byte LM (configs/default.py, seq_len 128, learned
positions; its cached baseline is shared with experiments.compress_lm) for
the quantization rows' perplexity, and a small RoPE Llama from the zoo
trained here on the same bytes (BOS-prefixed windows of 256 with planted
key/value needles) for every row: perplexity, streaming past the training
length, needle retrieval.

Retrieval (needle accuracy) needs induction heads. Measured on 2 CPU cores,
batch 8 x 256 (teacher-forced needle accuracy at context 128, logged every
`log_every` steps): no recipe tried so far reached a nonzero score:
copy strings with a fixed period of 128 and symbols drawn with replacement
(versions <= 2: 1000-1800 steps; the copy loss fell, but a fixed period is
solved by a relative-position head, and with repeated symbols one-token
induction is ambiguous); a varying period with repeated symbols stayed on
the copy plateau (loss ~ln 64) for 800 steps at lr 3e-3; distinct symbols
with a varying period (version 3) stayed on it for a 200-step copy phase,
and needle accuracy was still 0 after 400 more mixed steps.
Validation perplexity is measured on plain text windows only, so the
needle / copy windows in training do not enter it.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  base = default.get_config()
  c.data = base.data            # the byte LM's data and split
  c.byte_lm = ml_collections.ConfigDict()
  c.byte_lm.enabled = True
  c.byte_lm.model = base.model
  c.byte_lm.train = base.train
  c.byte_lm.windows = 64        # validation windows of seq_len (128)

  # compressjax.models.llama.LlamaConfig (a byte-level RoPE Llama)
  c.llama = ml_collections.ConfigDict()
  c.llama.hidden_size = 128
  c.llama.intermediate_size = 384
  c.llama.num_hidden_layers = 4
  c.llama.num_attention_heads = 4
  c.llama.num_key_value_heads = 2
  c.llama.rope_theta = 10000.0
  c.llama.seq_len = 256         # training length
  c.llama.steps = 1800
  c.llama.copy_steps = 300      # first: copying strings of distinct
                                # symbols, varying period (induction)
  c.llama.batch_size = 8
  c.llama.learning_rate = 3e-3
  c.llama.warmup = 100
  c.llama.end_lr_fraction = 0.1
  c.llama.weight_decay = 0.1
  c.llama.grad_clip = 1.0
  c.llama.needle_fraction = 0.4   # text windows with planted needles
  c.llama.copy_fraction = 0.15    # copy windows after the copy phase
  c.llama.log_every = 100
  c.llama.windows = 32          # validation windows of seq_len

  # Streaming past the training length (StreamingLLM): one stream of
  # `length` bytes per row of `batch`, a cache of `budget` tokens.
  c.stream = ml_collections.ConfigDict()
  c.stream.length = 1024
  c.stream.batch = 4
  c.stream.budget = 128

  # Needle retrieval: prompts of each context length with the needle at each
  # depth, `trials` per cell; exact match of the 5-byte value, greedy.
  c.needle = ml_collections.ConfigDict()
  c.needle.contexts = "128,256"
  c.needle.depths = "0.1,0.3,0.5,0.7,0.9"
  c.needle.trials = 8

  # Throughput: greedy decoding of `new_tokens` after a `prompt` at each
  # batch size (compile time excluded).
  c.speed = ml_collections.ConfigDict()
  c.speed.batches = "1,16"
  c.speed.prompt = 192
  c.speed.new_tokens = 64
  c.speed.rows = "float,int8,int4,kivi2_r32,window_25,sink_25,h2o_25,snapkv_25"

  # Policy knobs shared by the rows.
  c.kv = ml_collections.ConfigDict()
  c.kv.group_size = 32          # quantization groups (tokens or channels)
  c.kv.residual = 32            # KIVI's full-precision window R
  c.kv.sinks = 4
  c.kv.snapkv_window = 16
  c.kv.pyramid_beta = 8.0

  # Rows (experiments.kv_lm.ROWS): formats, and policy_<percent budget>.
  c.rows = ("float,int8,fp8,int4,kivi4,kivi2_r32,kivi2_r0,kivi2_rot,"
            "window_25,sink_25,h2o_25,snapkv_25,tova_25,random_25,"
            "h2o_pyramid_25,h2o_25+int4,"
            "window_12,sink_12,h2o_12,snapkv_12,tova_12,"
            "window_50,sink_50,h2o_50,snapkv_50,tova_50")
  return c
