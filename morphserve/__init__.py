"""MorphServe: workload-aware layer morphing and KV-cache resizing for vLLM."""

__version__ = "0.1.0"
