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
