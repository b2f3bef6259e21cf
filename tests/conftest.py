import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from hypothesis import settings  # noqa: E402

# ci: the suite's budget (12 minutes on 2 cores); thorough: before a release
# or after touching numerics (HYPOTHESIS_PROFILE=thorough)
settings.register_profile("ci", max_examples=12, deadline=None,
                          print_blob=True)
settings.register_profile("thorough", max_examples=200, deadline=None,
                          print_blob=True)
settings.register_profile("dev", max_examples=10, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Modules whose one fixture or notebook runs take a minute or more. With
# --dist=loadfile a module is one unit of work; handing the long ones out
# first (longest-processing-time order) keeps one worker from finishing the
# suite alone on a long module while the other idles.
LONG_MODULES = ("tests/test_experiment.py", "tests/test_notebooks.py",
                "tests/test_compress_hf.py", "tests/test_sweep.py",
                "tests/test_end_to_end_hf.py")


def pytest_collection_modifyitems(config, items):
  del config

  def rank(item):
    path = item.nodeid.split("::", 1)[0]
    return LONG_MODULES.index(path) if path in LONG_MODULES else len(
        LONG_MODULES)

  items.sort(key=rank)  # stable: the rest keep their order
