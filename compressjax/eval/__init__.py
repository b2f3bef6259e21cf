"""Evaluation of (compressed) language models: perplexity (GPTQ / WikiText
protocol), zero-shot multiple choice (lm-evaluation-harness convention) and
generation with the KV cache. Every entry point takes a model (a
`models.hub.Pretrained` decoder, a zoo decoder module, the byte-level
`models.transformer.TransformerLM`, or an `eval.lm.CausalLM`) and a params
tree, dense or compressed, and runs the unmodified model through `cj.run`.

    from compressjax import eval as cj_eval
    cj_eval.perplexity(pre, tree, text, seqlen=2048).ppl
    cj_eval.zeroshot(pre, tree, "python_syntax").acc_norm
    cj_eval.generate(pre, tree, ["def main("], max_new_tokens=32).texts
"""

from compressjax.eval.generation import GenerationResult, Sampling, generate
from compressjax.eval.lm import CausalLM, causal_lm
from compressjax.eval.language_modeling import PerplexityResult, perplexity
from compressjax.eval.multiple_choice import (BUILTIN_TASKS, Task, ZeroShotResult,
                                       encode_pair, load_task, loglikelihoods,
                                       zeroshot)

__all__ = ["BUILTIN_TASKS", "CausalLM", "GenerationResult",
           "PerplexityResult", "Sampling", "Task", "ZeroShotResult",
           "causal_lm", "encode_pair", "generate", "load_task",
           "loglikelihoods", "perplexity", "zeroshot"]
