"""`morphserve doctor`: what this machine runs, whether a pack serves here, and what to pick.

- facts: gathers readings (CPU flags, vLLM, kernels, the pack, kernel speed); glue.
- advice: turns readings into problems with fixes and a recommendation; pure logic.
- render: one screen of text.
"""
