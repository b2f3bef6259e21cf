"""Example counts for property tests, from the hypothesis profile conftest
loads (ci / thorough / dev)."""

from hypothesis import settings

# Property tests whose every example compiles new shapes draw half the
# profile's examples (6 in ci, 100 in thorough).
COMPILING_EXAMPLES = max(6, settings.default.max_examples // 2)
