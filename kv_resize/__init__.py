"""Elastic KV cache: one memory budget for weights plus KV, a block pool that grows and
shrinks at step boundaries, and backings that commit and release the memory behind it."""
