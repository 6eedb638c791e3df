"""`/morphserve/*`: the manual control surface, on the same HTTP server as vLLM's API.

vLLM's own AuthenticationMiddleware guards only /v1-style prefixes, so these routes check
the bearer token themselves, against the same keys (`--api-key`, else VLLM_API_KEY) and
with the same constant-time comparison. They reach the engine core by utility-method
*name* (vLLM's UTILITY request path); nothing is pickled.
"""

from __future__ import annotations

import json
import secrets

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()


def _authorized(request: Request) -> bool:
    import vllm.envs as envs

    args = getattr(request.app.state, "args", None)
    keys = [k for k in ((getattr(args, "api_key", None) or []) or [envs.VLLM_API_KEY]) if k]
    if not keys:
        return True
    header = request.headers.get("Authorization", "")
    given = header[len("Bearer "):] if header.startswith("Bearer ") else ""
    ok = False
    for key in keys:
        ok |= secrets.compare_digest(given.encode(), key.encode())
    return ok


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _call(request: Request, method: str, *args):
    client = request.app.state.engine_client
    return await client.engine_core.call_utility_async(method, *args)


@router.get("/morphserve/state")
async def get_state(request: Request):
    if not _authorized(request):
        return _error(401, "Unauthorized")
    return JSONResponse(await _call(request, "morphserve_state"))


@router.post("/morphserve/level")
async def post_level(request: Request):
    if not _authorized(request):
        return _error(401, "Unauthorized")
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return _error(400, f"body must be JSON like {{\"quantized_layers\": 4}}: {e}")
    if not isinstance(body, dict) or set(body) != {"quantized_layers"}:
        return _error(400, 'body must be exactly {"quantized_layers": <int or null>}')
    level = body["quantized_layers"]
    if level is not None and (isinstance(level, bool) or not isinstance(level, int)):
        return _error(400, f"quantized_layers must be an integer or null, got {level!r}")
    result = await _call(request, "morphserve_set_level", level)
    if not result.get("ok"):
        return _error(400 if "must be" in result.get("error", "") else 500, result.get("error", "failed"))
    return JSONResponse(result)
