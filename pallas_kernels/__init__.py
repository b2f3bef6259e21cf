"""Pallas kernels (and their plain-jnp references) for compressed operands."""
