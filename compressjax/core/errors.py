"""Errors raised by compressjax. Every message names the parameter path and the fix."""


class CompressionError(ValueError):
  """Bad input to a compressed type or transform.

  Args:
    message: what is wrong and what to do.
    path: the "/"-joined parameter path concerned, when there is one.
  """

  def __init__(self, message: str, path: str | None = None):
    self.path = path
    if path is not None:
      message = f"{message} [param '{path}']"
    super().__init__(message)


class TreeMismatchError(CompressionError):
  """A (compressed) tree does not match the structure the model expects."""
