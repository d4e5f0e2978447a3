"""Jobs: the durable store, the worker (the one place that runs the engine), files and webhooks."""
