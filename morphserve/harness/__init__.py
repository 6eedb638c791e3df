"""One harness for tests, benchmarks and the evaluation: server processes (spawn, health,
reap, memory), free ports, the in-process engine-step driver and the model's KV shape."""
