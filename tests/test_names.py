"""Each dotted name means one thing. A package is never shadowed by an
attribute (`import compressjax.quantize` must not return a function), and a
module is shadowed only by its own eponymous entry point (`sparsity.wanda`
is the function `wanda` defined in `sparsity/wanda.py`), never by something
defined elsewhere."""

import importlib
import pkgutil

import compressjax


def test_names_mean_one_thing():
  clashes = []
  for info in pkgutil.walk_packages(compressjax.__path__, "compressjax."):
    parent_name, _, leaf = info.name.rpartition(".")
    module = importlib.import_module(info.name)
    attr = getattr(importlib.import_module(parent_name), leaf)
    if attr is module:
      continue
    eponymous = getattr(module, leaf, None) is attr and getattr(
        attr, "__module__", None) == info.name
    if info.ispkg or not eponymous:
      clashes.append(f"{info.name} -> {attr!r}")
  assert not clashes, "names shadowing modules:\n" + "\n".join(clashes)
