"""Trace replay: read a trace, replay it against a server with vLLM's `bench serve`, and
summarise per-request latencies against the SLOs."""
