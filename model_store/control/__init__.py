"""The model control plane: the registry (versions, routing, release) and the `models` watcher that follows it."""
