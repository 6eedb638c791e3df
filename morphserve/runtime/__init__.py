"""Serve-time runtime: the controller in the engine-core process and the layer set in the
worker. Talks to vLLM only through `morphserve.vllm` adapters (docs/ARCHITECTURE.md)."""
