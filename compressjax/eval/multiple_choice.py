"""Zero-shot multiple choice, the lm-evaluation-harness way.

Each item is {"context": str, "choices": [str, ...], "label": int} (a JSONL
file of them, see `load_task`; `BUILTIN_TASKS` ships with compressjax). Each
choice is a continuation of the context, scored by the summed log-likelihood
of its tokens given the context:

    ll_c  = sum_{t in continuation c} log p(x_t | x_<t)
    acc      = [argmax_c ll_c == label]
    acc_norm = [argmax_c ll_c / len(c) == label]   (len in characters, as
                                                    the harness; = bytes for
                                                    ASCII choices)

averaged over items, with the harness' standard error of a mean
(sample standard deviation / sqrt(n)) and the chance level mean(1 / #choices).

Tokenization follows the harness' `TemplateLM._encode_pair`: trailing
whitespace of the context moves to the front of the continuation, the
context and context + continuation are encoded separately and the
continuation's tokens are the tail of the joint encoding beyond the
context's length (so BPE merges across the boundary are honoured; where a
merge crosses the boundary itself, e.g. ")" + ":" -> "):", the split moves
back to the last boundary both encodings share, and the merged token is
scored with the continuation: the harness' split would be misaligned, or
empty, there); an empty
context is replaced by one prefix token (BOS, else EOS). Special tokens: the
tokenizer's own (add_special_tokens=True: a Llama tokenizer adds BOS, as the
harness now delegates to the tokenizer; pass False for the older
harness' no-special-tokens default). Inputs longer than the model's
max_length lose tokens on the left (the harness' truncation).

Requests (item x choice) are sorted by length and scored in right-padded
batches with an attention mask, each padded to a multiple of `pad_multiple`
tokens and to `batch_size` rows, so few shapes compile; through `cj.run`,
so `tree` may be compressed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Any, Sequence

import numpy as np
from absl import logging

from compressjax.core.errors import CompressionError
from compressjax.eval.lm import causal_lm, scorer
from compressjax.eval.progress import progress as progress_bar

_TASK_DIR = pathlib.Path(__file__).resolve().parent.parent / "data" / "tasks"
# name -> file of the tasks that ship with compressjax (compressjax/data/tasks)
BUILTIN_TASKS = {"python_syntax": _TASK_DIR / "python_syntax.jsonl"}


@dataclasses.dataclass(frozen=True)
class Item:
  context: str
  choices: tuple[str, ...]
  label: int


@dataclasses.dataclass(frozen=True)
class Task:
  """Items and a description (name, file, items, chance)."""

  name: str
  items: tuple[Item, ...]
  source: str

  @property
  def chance(self) -> float:
    """Expected accuracy of a uniform random guess: mean(1 / #choices)."""
    return float(np.mean([1.0 / len(i.choices) for i in self.items]))

  @property
  def description(self) -> dict:
    return dict(task=self.name, source=self.source, items=len(self.items),
                chance=round(self.chance, 6))


def _item(d: Any, where: str) -> Item:
  if not isinstance(d, dict):
    raise CompressionError(f"{where}: an item must be a JSON object "
                           '{"context": str, "choices": [str], "label": int}')
  missing = [k for k in ("context", "choices", "label") if k not in d]
  if missing:
    raise CompressionError(f"{where}: missing {missing}; an item is "
                           '{"context": str, "choices": [str], "label": int}')
  ctx, choices, label = d["context"], d["choices"], d["label"]
  if not isinstance(ctx, str):
    raise CompressionError(f"{where}: context must be a string")
  if (not isinstance(choices, list) or len(choices) < 2
      or not all(isinstance(c, str) and c for c in choices)):
    raise CompressionError(f"{where}: choices must be a list of at least 2 "
                           "non-empty strings")
  if (not isinstance(label, int) or isinstance(label, bool)
      or not 0 <= label < len(choices)):
    raise CompressionError(f"{where}: label must be an int index into the "
                           f"{len(choices)} choices, got {label!r}")
  return Item(ctx, tuple(choices), label)


def load_task(task: str | pathlib.Path | Sequence[dict]) -> Task:
  """A Task from a built-in name ('python_syntax'), a JSONL file path (one
  item per line; blank lines skipped), or a list of item dicts."""
  if isinstance(task, Task):
    return task
  if isinstance(task, (list, tuple)):
    return Task("items", tuple(_item(d, f"item {i}")
                               for i, d in enumerate(task)), "in memory")
  name = str(task)
  path = BUILTIN_TASKS.get(name, pathlib.Path(name))
  if not path.is_file():
    raise CompressionError(
        f"task {name!r} is neither a built-in task ({sorted(BUILTIN_TASKS)})"
        " nor a JSONL file")
  items = []
  for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip():
      continue
    try:
      d = json.loads(line)
    except json.JSONDecodeError as e:
      raise CompressionError(f"{path}:{n} is not valid JSON ({e})") from None
    items.append(_item(d, f"{path}:{n}"))
  if not items:
    raise CompressionError(f"{path} holds no items")
  return Task(name if name in BUILTIN_TASKS else path.stem, tuple(items),
              str(path))


def encode_pair(tokenizer: Any, context: str, continuation: str,
                add_special_tokens: bool = True
                ) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids) as the harness encodes a request."""
  if context == "":
    prefix = next((i for i in (tokenizer.bos_id, tokenizer.eos_id)
                   if i is not None), None)
    if prefix is None:
      raise CompressionError("an empty context needs a BOS or EOS token to "
                             "condition on; the tokenizer has neither")
    return [prefix], list(tokenizer.encode(continuation,
                                           add_special_tokens=False))
  n = len(context) - len(context.rstrip())
  if n:
    context, continuation = context[:-n], context[-n:] + continuation
  whole = list(tokenizer.encode(context + continuation,
                                add_special_tokens=add_special_tokens))
  ctx = list(tokenizer.encode(context, add_special_tokens=add_special_tokens))
  # The harness splits at len(ctx). Where a merge crosses the boundary (the
  # context's tokens are not a prefix of the joint encoding) that split is
  # misaligned (its continuation can even be empty); split at the last
  # token boundary both encodings share instead.
  n = len(ctx)
  if whole[:n] != ctx:
    n = next((i for i, (a, b) in enumerate(zip(whole, ctx)) if a != b),
             min(len(whole), len(ctx)))
  return whole[:n], whole[n:]


def loglikelihoods(model: Any, tree: Any,
                   requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                   *, batch_size: int = 16, pad_multiple: int = 16,
                   progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """(sum of log p(continuation | context) (R,), greedy (R,) bool) of
  (context ids, continuation ids) requests, as the harness'
  `_loglikelihood_tokens`."""
  lm = causal_lm(model)
  if batch_size < 1 or pad_multiple < 1:
    raise CompressionError("batch_size and pad_multiple must be >= 1")
  seqs = []
  for r, (ctx, cont) in enumerate(requests):
    if not cont:
      raise CompressionError(f"request {r} has an empty continuation: "
                             "nothing to score")
    if lm.max_length is not None and len(cont) > lm.max_length:
      raise CompressionError(
          f"request {r}: the continuation has {len(cont)} tokens, more than "
          f"the model's max_length {lm.max_length}")
    s = list(ctx) + list(cont)
    if lm.max_length is not None:
      s = s[-(lm.max_length + 1):]
    seqs.append((s, len(cont)))
  order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
  step = scorer(lm)
  sums = np.zeros(len(seqs), np.float64)
  greedy = np.zeros(len(seqs), bool)
  starts = range(0, len(order), batch_size)
  for b in progress_bar(starts, len(starts), "zero-shot", progress):
    idx = order[b:b + batch_size]
    longest = max(len(seqs[i][0]) - 1 for i in idx)
    t = -(-longest // pad_multiple) * pad_multiple
    if lm.max_length is not None:
      t = min(t, lm.max_length)
    ids = np.zeros((batch_size, t), np.int32)
    tgt = np.zeros((batch_size, t), np.int32)
    mask = np.zeros((batch_size, t), np.int32)
    score = np.zeros((batch_size, t), np.float32)
    for r, i in enumerate(idx):
      s, n = seqs[i]
      L = len(s) - 1
      ids[r, :L], tgt[r, :L], mask[r, :L] = s[:-1], s[1:], 1
      score[r, L - n:L] = 1.0
    mask[len(idx):, 0] = 1  # dummy rows: one token, nothing scored
    ll, hit = step(tree, ids, mask, tgt, score)
    sums[idx] = np.asarray(ll)[:len(idx)]
    greedy[idx] = np.asarray(hit)[:len(idx)]
  return sums, greedy


def mean_stderr(x: np.ndarray) -> float:
  """The harness' standard error of a mean: sample std (ddof 1) / sqrt(n)."""
  x = np.asarray(x, np.float64)
  if x.size < 2:
    return float("nan")
  return float(np.std(x, ddof=1) / math.sqrt(x.size))


@dataclasses.dataclass(frozen=True)
class ZeroShotResult:
  """acc / acc_norm, their standard errors, chance; `loglik` holds each
  item's per-choice summed log-likelihoods."""

  acc: float
  acc_stderr: float
  acc_norm: float
  acc_norm_stderr: float
  chance: float
  items: int
  seconds: float
  task: dict
  loglik: tuple[tuple[float, ...], ...] = dataclasses.field(repr=False,
                                                             default=())

  def as_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d.pop("loglik")
    return d


def zeroshot(model: Any, tree: Any, task: Any = "python_syntax", *,
             tokenizer: Any = None, batch_size: int = 16,
             pad_multiple: int = 16, add_special_tokens: bool = True,
             progress: bool = True) -> ZeroShotResult:
  """Zero-shot multiple-choice accuracy of a causal LM on `tree`.

  Args:
    model: a Pretrained, zoo decoder module, TransformerLM or CausalLM.
    tree: its variables, possibly compressed.
    task: a built-in task name, a JSONL path, a list of item dicts or a Task.
  """
  lm = causal_lm(model, tokenizer)
  tok = lm.require_tokenizer()
  task = load_task(task)
  start = time.perf_counter()
  requests = [encode_pair(tok, item.context, c, add_special_tokens)
              for item in task.items for c in item.choices]
  ll, _ = loglikelihoods(lm, tree, requests, batch_size=batch_size,
                         pad_multiple=pad_multiple, progress=progress)
  acc, acc_norm, per_item = [], [], []
  pos = 0
  for item in task.items:
    x = ll[pos:pos + len(item.choices)]
    pos += len(item.choices)
    lens = np.array([float(len(c)) for c in item.choices])
    acc.append(float(np.argmax(x) == item.label))
    acc_norm.append(float(np.argmax(x / lens) == item.label))
    per_item.append(tuple(float(v) for v in x))
  res = ZeroShotResult(
      acc=float(np.mean(acc)), acc_stderr=mean_stderr(acc),
      acc_norm=float(np.mean(acc_norm)), acc_norm_stderr=mean_stderr(acc_norm),
      chance=task.chance, items=len(task.items),
      seconds=round(time.perf_counter() - start, 3), task=task.description,
      loglik=tuple(per_item))
  logging.info("zero-shot %s: acc %.4f +- %.4f, acc_norm %.4f +- %.4f "
               "(chance %.4f, %d items)", task.name, res.acc, res.acc_stderr,
               res.acc_norm, res.acc_norm_stderr, res.chance, res.items)
  return res
