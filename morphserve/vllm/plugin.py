"""vLLM `general_plugins` entry point.

vLLM calls `register()` in every process it starts (API server, engine core, workers).
It installs MorphServe's hooks (morphserve/vllm/patches.py). They are inert unless
`--additional-config '{"morphserve": {...}}'` activates MorphServe, so a server that merely
has the package installed behaves exactly like plain vLLM. A hook that cannot be
installed is an error, never a silent fallback.

On a vLLM other than the one MorphServe was written against, the package must not break
a plain server: only a guard is installed, which refuses to start an engine that asks for
MorphServe, and plain engines run untouched.
"""

import logging

log = logging.getLogger("morphserve")


def register() -> None:
    from morphserve.vllm.patches import PatchError, apply_patches, check_vllm_version, install_version_guard

    try:
        check_vllm_version()
    except PatchError as e:
        log.warning("%s; MorphServe's hooks are not installed (plain vLLM is unaffected)", e)
        install_version_guard(str(e))
        return
    apply_patches()
    from morphserve.vllm.kernels import hide_ops_for_tests

    hide_ops_for_tests()  # test-only (MORPHSERVE_TEST_HIDE_OPS): act as a vLLM build without these ops
    log.debug("MorphServe hooks installed")
