"""Progress bars for evaluation loops: tqdm when installed, otherwise one
stderr line rewritten in place; nothing when disabled."""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def _plain(items: Iterable[T], total: int | None, desc: str
           ) -> Iterator[T]:
  start, last = time.perf_counter(), 0.0
  i = 0
  for i, x in enumerate(items, 1):
    yield x
    now = time.perf_counter()
    if now - last > 0.5 or i == total:
      last = now
      of = f"/{total}" if total else ""
      sys.stderr.write(f"\r{desc}: {i}{of} ({now - start:.1f}s)")
      sys.stderr.flush()
  if i:
    sys.stderr.write("\n")


def progress(items: Iterable[T], total: int | None = None, desc: str = "",
             enabled: bool = True) -> Iterable[T]:
  """`items`, with a progress bar on stderr when `enabled`."""
  if not enabled:
    return items
  try:
    from tqdm.auto import tqdm
  except ImportError:
    return _plain(items, total, desc)
  return tqdm(items, total=total, desc=desc, leave=False)
