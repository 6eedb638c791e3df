"""The architecture, enforced: MorphServe's rooms, and its one door into vLLM.

MorphServe is written against the internals of one vLLM release (0.32.0). A port to another
release, or to CUDA, must be able to change one package, `morphserve/vllm/` (the boundary),
and nothing else. That only stays true if nobody else imports vLLM or reaches into its
objects, so these tests fail when:

1. a product module outside the boundary imports vLLM;
2. a script or test imports more of vLLM than its public top-level API (a short, documented
   list of test files may import internals, and the list fails when an entry goes stale);
3. a product module outside the boundary, or a script, touches a vLLM internal attribute;
4. a lower room imports a higher one (quant_layers, kv_resize and policies know nothing of
   `morphserve`; policies knows nothing of the other two);
5. the boundary's docstring stops listing the boundary's modules.

All of it is static (tests/architecture_rules.py reads syntax trees): nothing here imports
vLLM or MorphServe, and the whole file runs in a couple of seconds. See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import ast
import re

import pytest

from tests.architecture_rules import (
    REPO,
    attribute_accesses,
    definitions,
    imported_roots,
    imports,
    is_private,
    is_vllm,
    module_attributes,
    parse,
    python_files,
    vllm_definers,
    vllm_public_api,
)

BOUNDARY = "morphserve/vllm"
# The rooms below `morphserve`: plain libraries that MorphServe's packages build on.
ROOMS = ("quant_layers", "kv_resize", "policies")
# Every top-level package or folder of MorphServe's own code.
OURS = ("morphserve", *ROOMS, "scripts", "tests")
# This test and its helper name vLLM's internals on purpose; they are not product code.
THIS_TEST = ("tests/test_architecture.py", "tests/architecture_rules.py")

# vLLM internals MorphServe used to reach into from outside the boundary (the attributes the
# boundary's adapters now wrap: docs/ARCHITECTURE.md, "The vLLM boundary"). An attribute of
# this name outside the boundary is an offence whatever object it is on: the names are
# specific enough that a MorphServe object having one would itself be a leak of vLLM's model.
VLLM_INTERNALS = frozenset({
    # engine core and executor
    "engine_core", "model_executor", "collective_rpc", "vllm_config", "llm_engine",
    # worker and model runner
    "model_runner", "input_batch", "cpu_linear",
    # KV cache and scheduler
    "kv_cache_config", "kv_cache_manager", "kv_cache_tensors", "block_pool", "free_block_queue",
    "num_gpu_blocks", "req_to_blocks", "single_type_managers", "coordinator",
    "prev_step_scheduled_req_ids", "cached_block_hashes_by_block", "_maybe_evict_cached_block",
    "_preempt_request", "max_num_active_reqs",
})

# Test files that may import vLLM's internals, and why. Keep this short: every other test
# reaches vLLM through the boundary or through `from vllm import <public name>`.
# (tests/test_host_backing.py and tests/plain_vllm.py were once candidates; today they import
# no vLLM internal: plain_vllm drives vLLM through morphserve.vllm.offline_engine. Listing
# them would fail test_the_internal_import_exceptions_are_still_needed.)
INTERNAL_IMPORT_EXCEPTIONS = {
    # The elastic pool's invariants are property-tested against vLLM's real BlockPool (and its
    # block-hash helper), built directly, without an engine: the point of the test is that the
    # cap holds over vLLM's own free queue and prefix cache, not over a fake.
    "tests/test_elastic_pool.py": "property tests over vLLM's real BlockPool",
    # Transitions (mixed plans, a level inside a drained restore) over the same real BlockPool:
    # the shrink and give-back must hold over vLLM's free queue, not over a fake.
    "tests/test_transition_plans.py": "transitions over vLLM's real BlockPool",
    # The cold tail reorders vLLM's own free queue and evicts its prefix cache: over a fake,
    # the test could not show that vLLM hands out a cold block only when no warm one is free.
    "tests/test_cold_tail.py": "the cold tail over vLLM's real BlockPool",
    # The bf16 forward's weight ownership on vLLM's torch fallback (the AVX2 path), reached on
    # any CPU through vLLM's own dispatch with oneDNN switched off: a fake closure would only
    # restate what the test assumes vLLM does.
    "tests/test_bf16_forward.py": "vLLM's real bf16 dispatch, its torch fallback forced",
    # These test the boundary itself against the vLLM objects it patches or reads: a faked
    # platform for the non-CPU refusal, the patched EngineCore after a version mismatch,
    # the W4A8 switch in vLLM's env cache, and the metric names vLLM's loggers export.
    "tests/test_control_guards.py": "the boundary's refusals and version guard against vLLM's own objects",
    "tests/test_kernel_pin.py": "the W4A16 pin against vLLM's env cache",
    "tests/test_examples.py": "the dashboard queries only names vLLM's loggers export",
    "tests/test_backends.py": "the CUDA opt-in and kernel prediction against vLLM's platform object",
    # `--compute-cpus all` is one of vLLM's env knobs; only vLLM's own binding code can show that
    # the knob it sets makes rank 0 compute on every core (a fake would restate the assumption).
    "tests/test_compute_cpus.py": "the reserve knob against vLLM's own automatic CPU binding",
}


def outside_boundary() -> list[str]:
    """Product modules that must not know vLLM: all of MorphServe's packages but the boundary."""
    return python_files("morphserve", *ROOMS, exclude=(BOUNDARY,))


def scripts_and_tests() -> list[str]:
    """Scripts and tests, less this test and its helper: they name vLLM's modules as data
    (and the scanners' self-test holds sample code that imports vLLM, on purpose)."""
    return python_files("scripts", "tests", exclude=THIS_TEST)


def check(offenders: list[tuple[str, int, str]], why: str) -> None:
    """Fail with `why` and one `path:line: what` per offence, all of them, sorted by path then
    line (and without pytest's repr of the list, which would cut them short)."""
    if offenders:
        lines = [f"{path}:{line}: {what}" for path, line, what in sorted(set(offenders))]
        pytest.fail(f"{why}\n" + "\n".join(lines), pytrace=False)


# --- rule 1 ----------------------------------------------------------------------------------

def test_only_the_boundary_imports_vllm():
    """Outside morphserve/vllm/, no product module imports vLLM: not at the top, not inside a
    function, not under TYPE_CHECKING (a type names an internal too), not by
    importlib.import_module("vllm...") and not in code passed to a subprocess."""
    offenders = [(path, imp.line, imp.describe())
                 for path in outside_boundary() for imp in imports(path) if is_vllm(imp.module)]
    check(offenders, "these modules import vLLM outside the boundary; move the code into "
                     "morphserve/vllm/ (or call an adapter there):")


# --- rule 2 ----------------------------------------------------------------------------------

def internal_vllm_imports(path: str) -> list[tuple[str, int, str]]:
    """What a script or test imports of vLLM beyond `__all__` of vllm/__init__.py: any
    `vllm.<submodule>`, `from vllm import <name not in __all__>`, and, after a bare
    `import vllm`, any `vllm.<name not in __all__>`."""
    public = vllm_public_api()
    found = []
    for imp in imports(path):
        if not is_vllm(imp.module):
            continue
        if imp.module != "vllm":
            found.append((path, imp.line, imp.describe()))
        elif imp.names:
            found += [(path, imp.line, f"from vllm import {n}") for n in imp.names if n not in public]
        else:
            found += [(path, line, f"vllm.{name}") for line, name in module_attributes(path, imp.alias)
                      if name not in public]
    return found


def test_scripts_and_tests_use_only_vllms_public_api():
    """Scripts and tests may say `from vllm import LLM, SamplingParams` (what vLLM exports in
    __all__), and reach everything else through the boundary, so a vLLM upgrade does not
    break them one by one."""
    offenders = [o for path in scripts_and_tests() if path not in INTERNAL_IMPORT_EXCEPTIONS
                 for o in internal_vllm_imports(path)]
    check(offenders, f"these scripts/tests import vLLM internals; use `from vllm import <name>` with "
                     f"a name in vllm.__all__ ({', '.join(sorted(vllm_public_api()))}), or a "
                     f"morphserve.vllm adapter:")


def test_the_internal_import_exceptions_are_still_needed():
    """An exception that no longer imports an internal is removed from the list, so the list
    says exactly which tests are tied to vLLM's internals."""
    stale = [path for path in INTERNAL_IMPORT_EXCEPTIONS
             if not (REPO / path).is_file() or not internal_vllm_imports(path)]
    assert not stale, ("INTERNAL_IMPORT_EXCEPTIONS lists files that import no vLLM internal "
                       "(or no longer exist); remove them: " + ", ".join(stale))


# --- rule 3 ----------------------------------------------------------------------------------

def ours_defined() -> set[str]:
    """Every name MorphServe's own code defines (functions, classes, module and class
    attributes, `self.x = ...`). A private name MorphServe defines is taken to be its own,
    even when vLLM happens to define the same name (`_run`, `_stop`, `_thread`...)."""
    return {name for path in python_files(*OURS, exclude=THIS_TEST) for name in definitions(parse(path))}


def internal_accesses(paths: list[str]) -> list[tuple[str, int, str]]:
    """The attribute accesses (`obj.name`, or getattr/setattr/hasattr/delattr(obj, "name")) in
    `paths` that name a vLLM internal:
    (a) one of VLLM_INTERNALS, on any object; or
    (b) a private name (`_x`) that vLLM's installed source defines and MorphServe does not.
    (b) skips accesses that start from a third-party module imported by name (`torch._C`,
    `torch.ops._C.op`): those are that library's, even though vLLM defines a `_C` too.
    """
    ours = ours_defined()
    offenders, candidates = [], []  # candidates: (path, line, name) for (b), if vLLM defines name
    for path in paths:
        roots = imported_roots(path)
        for a in attribute_accesses(path):
            if a.name in VLLM_INTERNALS:
                offenders.append((path, a.line, a.name))
            elif is_private(a.name) and a.name not in ours and roots.get(a.root) in (None, "vllm", *OURS):
                candidates.append((path, a.line, a.name))
    vllm_private = vllm_definers(frozenset(name for _, _, name in candidates))
    return offenders + [c for c in candidates if c[2] in vllm_private]


def test_nothing_outside_the_boundary_touches_vllm_internals():
    """Product code outside the boundary, and the scripts, reach vLLM's objects only through
    the boundary's adapters (EngineLink, SchedulerView, VllmBlockStore, the offline engine...):
    no attribute access there names a vLLM internal (see internal_accesses)."""
    offenders = internal_accesses(outside_boundary() + python_files("scripts"))
    check(offenders, "these modules touch vLLM internals outside the boundary; add (or use) an "
                     "adapter in morphserve/vllm/:")


# --- rule 4 ----------------------------------------------------------------------------------

def test_rooms_do_not_import_upwards():
    """quant_layers, kv_resize and policies are libraries `morphserve` builds on: they never
    import `morphserve` (no cycles), and the policies (plain decisions over signals) import
    neither the weights room nor the KV room."""
    forbidden = {room: {"morphserve"} for room in ROOMS}
    forbidden["policies"] |= {"quant_layers", "kv_resize"}
    offenders = [(path, imp.line, imp.describe())
                 for room in ROOMS for path in python_files(room) for imp in imports(path)
                 if imp.module.split(".")[0] in forbidden[room]]
    check(offenders, "these room modules import a room above them:")


# --- rule 5 ----------------------------------------------------------------------------------

_LISTED = re.compile(r"^\s*[-*]\s+`?([A-Za-z_][\w.]*?)(?:\.py)?`?\s*:", re.MULTILINE)


def test_the_boundary_docstring_lists_its_modules():
    """Each module of morphserve/vllm/ has a `- name: what it is for` line in the package's
    docstring, and every name listed so is a module: the boundary's whole surface, in one
    place, so a reviewer sees at once when it grows."""
    init = REPO / BOUNDARY / "__init__.py"
    assert init.is_file(), f"the vLLM boundary package {BOUNDARY}/ is missing"
    modules = set()
    for path in python_files(BOUNDARY):
        rel = path[len(BOUNDARY) + 1:].removesuffix(".py").removesuffix("/__init__")
        if rel != "__init__":
            modules.add(rel.replace("/", "."))  # a subpackage's modules: `sub`, `sub.mod`
    listed = set(_LISTED.findall(ast.get_docstring(parse(f"{BOUNDARY}/__init__.py")) or ""))
    if modules != listed:
        pytest.fail(f"{BOUNDARY}/__init__.py's docstring must list each of its modules as a "
                    f"`- name: ...` line; missing: {', '.join(sorted(modules - listed)) or '-'}; "
                    f"listed but not a module: {', '.join(sorted(listed - modules)) or '-'}", pytrace=False)


# --- the scanners themselves -------------------------------------------------------------------

def test_the_scanners_see_every_form(tmp_path):
    """The rules above pass only if the scanners find what they look for: each form of import
    and attribute access is seen, with its line."""
    source = tmp_path / "sample.py"
    source.write_text(
        "import importlib, vllm\n"                                       # 1
        "from morphserve.vllm import engine\n"                           # 2: ours, not vLLM
        "from vllm import SamplingParams, envs\n"                        # 3
        "def f(llm):\n"                                                  # 4
        "    from vllm.v1.core.block_pool import BlockPool\n"            # 5
        "    importlib.import_module('vllm.v1.engine.core')\n"           # 6
        "    getattr(llm, 'llm_engine')\n"                               # 7
        "    return llm.engine_core._preempt_request, vllm.__version__, vllm.config\n"  # 8
        "CODE = '''\n"                                                   # 9
        "import vllm.utils\n"                                            # 10
        "x.kv_cache_manager\n"                                           # 11
        "'''\n")                                                         # 12
    path = str(source)
    assert [(i.line, i.module) for i in imports(path)] == [
        (1, "importlib"), (1, "vllm"), (2, "morphserve.vllm"), (3, "vllm"),
        (5, "vllm.v1.core.block_pool"), (6, "vllm.v1.engine.core"), (10, "vllm.utils")]
    assert [(line, what) for _, line, what in internal_vllm_imports(path)] == [
        (8, "vllm.config"), (3, "from vllm import envs"), (5, "from vllm.v1.core.block_pool import BlockPool"),
        (6, "import vllm.v1.engine.core"), (10, "import vllm.utils")]
    assert {(a.line, a.name) for a in attribute_accesses(path)} >= {
        (7, "llm_engine"), (8, "engine_core"), (8, "_preempt_request"), (11, "kv_cache_manager")}
    assert "SamplingParams" in vllm_public_api() and "platforms" not in vllm_public_api()

    # Rule 3's judgement. `_is_envs_cache_enabled` is a vLLM private (vllm/envs.py) that
    # MorphServe does not define; vLLM also defines a `_C`, but reached from the torch
    # module it is torch's; a name vLLM does not define is nobody's business here.
    source = tmp_path / "sample_accesses.py"
    source.write_text(
        "import torch\n"                                                 # 1
        "def g(x):\n"                                                    # 2
        "    torch._C, torch.ops._C.op, x._is_envs_cache_enabled()\n"    # 3
        "    x._not_defined_anywhere_zq, x.block_pool, setattr(x, '_preempt_request', 1)\n")  # 4
    path = str(source)
    assert sorted(internal_accesses([path])) == [
        (path, 3, "_is_envs_cache_enabled"), (path, 4, "_preempt_request"), (path, 4, "block_pool")]
