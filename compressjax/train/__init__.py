"""Training with compression: a small resumable, sharded loop (`loop`),
quantization-aware training (`qat`), knowledge distillation (`distill`) and
dynamic sparse training as optax transformations (`sparse`)."""
