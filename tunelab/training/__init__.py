"""The training loop and its strategies (batching, loss, schedule, checkpoints, logging)."""
