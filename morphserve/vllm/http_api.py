"""`/morphserve/*`: the manual control surface, on the same HTTP server as vLLM's API.

vLLM's own AuthenticationMiddleware guards only /v1-style prefixes, so these routes check
the bearer token themselves, against the same keys (`--api-key`, else VLLM_API_KEY) and
with the same constant-time comparison. Without any key, reading the state stays open
(like vLLM's /metrics) but changing the level is allowed only from this host (loopback):
vLLM listens on every interface by default, and a level change costs decode steps.
"This host" includes a web page open in a browser on it, so a level change must also be
one no page can forge (`cross_site_problem`).

They reach the engine core by utility-method *name* (vLLM's UTILITY request path; nothing
is pickled), with a timeout, so a stuck engine gives a 504 instead of a hung request.
Every body is checked here before anything is sent: a bad one gets a 400 and changes
nothing; no body can produce a 500.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import secrets

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()
MAX_BODY_BYTES = 1024  # {"level": N} is about 15 bytes
MAX_LEVEL = 1 << 20  # far above any model's layer count, far below msgpack's 2**64 limit
STATE_TIMEOUT_S = 10.0
LEVEL_TIMEOUT_S = 120.0  # a synchronous 0 <-> L transition of a large model takes seconds
BODY_HELP = 'body must be exactly {"level": <int or null>}'


def _keys(request: Request) -> list[str]:
    import vllm.envs as envs

    args = getattr(request.app.state, "args", None)
    return [k for k in ((getattr(args, "api_key", None) or []) or [envs.VLLM_API_KEY]) if k]


def _key_matches(request: Request, keys: list[str]) -> bool:
    header = request.headers.get("Authorization", "")
    given = header[len("Bearer "):] if header.startswith("Bearer ") else ""
    ok = False
    for key in keys:
        ok |= secrets.compare_digest(given.encode(), key.encode())
    return ok


FORWARDING_HEADERS = ("x-forwarded-for", "forwarded", "x-real-ip")


def _from_loopback(request: Request) -> bool:
    """A direct caller on this host. A request that passed through a proxy (any forwarding
    header: uvicorn may already have rewritten the client address from it) is not one."""
    if any(h in request.headers for h in FORWARDING_HEADERS):
        return False
    host = request.client.host if request.client else ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _call(request: Request, method: str, *args, timeout: float):
    """The engine core's answer, or an error response (never an exception)."""
    client = request.app.state.engine_client
    try:
        return await asyncio.wait_for(client.engine_core.call_utility_async(method, *args), timeout)
    except asyncio.TimeoutError:
        return _error(504, f"the engine did not answer {method} within {timeout:.0f} s")
    except Exception as e:  # engine dead or shutting down
        return _error(503, f"the engine could not answer {method}: {e}")


@router.get("/morphserve/state")
async def get_state(request: Request):
    keys = _keys(request)
    if keys and not _key_matches(request, keys):
        return _error(401, "Unauthorized")
    # ?kv_resident=1 also counts the KV pages resident in the reserve (mincore over the whole
    # reserve, on the engine's thread: too slow for every scrape, meant for soaks and audits),
    # so without a key only this host may ask for it, like a level change.
    detail = request.query_params.get("kv_resident") == "1"
    if detail and not keys and not _from_loopback(request):
        return _error(403, "kv_resident=1 needs --api-key (or VLLM_API_KEY) when the caller is not on this host")
    # The memory figures are the worker's last reading (taken at step boundaries, never for a
    # read); ?memory=0 leaves them out.
    memory = request.query_params.get("memory") != "0"
    # ?brief=1: the level, KV capacity, admission cap and token budget only (a poller's read)
    brief = request.query_params.get("brief") == "1"
    result = await _call(request, "morphserve_state", detail, memory, brief, timeout=STATE_TIMEOUT_S)
    return result if isinstance(result, JSONResponse) else JSONResponse(result)


# The body's key: `level` (a rung of the pack's ladder; with tiers, 0..2L). The old name
# `quantized_layers` meant the same number before the ladder had tiers; it is accepted, with
# a deprecation note in the answer, until the next release.
LEVEL_KEYS = ("level", "quantized_layers")
DEPRECATED_KEY_NOTE = 'the body key "quantized_layers" is deprecated; send {"level": <int or null>}'


def parse_level_body(raw: bytes):
    """(level, problem, key): the requested level (int or None) and the body key it came
    under, or a 400 message. Pure, so it is fuzzed directly."""
    if len(raw) > MAX_BODY_BYTES:
        return None, f"body is {len(raw)} bytes; {BODY_HELP}", None
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError, UnicodeDecodeError) as e:  # ValueError: bad JSON, 4,300+ digit ints
        return None, f"{BODY_HELP}: {str(e)[:200]}", None
    if not isinstance(body, dict) or len(body) != 1 or next(iter(body)) not in LEVEL_KEYS:
        return None, BODY_HELP, None
    [(key, level)] = body.items()
    if level is not None and (isinstance(level, bool) or not isinstance(level, int)):
        return None, f"{key} must be an integer or null, got {str(level)[:50]!r}", None
    if level is not None and not 0 <= level <= MAX_LEVEL:
        return None, f"{key} must be between 0 and the ladder's top level", None
    return level, None, key


def cross_site_problem(content_type: str | None, origin: str | None, host: str | None) -> tuple[int, str] | None:
    """Why a level change may come from another site's page, as (status, message), or None.

    - A page can POST cross-site without a CORS preflight only as text/plain, a form or
      multipart ("simple" requests), so the body must be declared application/json.
    - vLLM answers preflights for any origin by default (`--allowed-origins '["*"]'`), so a
      page could still send JSON: a browser always names the page's origin, which must then
      be this server's own. Non-browser clients send no Origin and are unaffected.
    Pure, so it is tested without a server."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        return 415, f"Content-Type must be application/json, got {content_type or 'none'!r}"
    if origin is not None:
        site = origin.strip().lower().partition("://")[2].rstrip("/")
        if not site or site != (host or "").strip().lower():
            return 403, f"cross-origin level changes are refused (Origin {origin[:100]!r}, Host {host!r})"
    return None


@router.post("/morphserve/level")
async def post_level(request: Request):
    keys = _keys(request)
    if keys and not _key_matches(request, keys):
        return _error(401, "Unauthorized")
    if not keys and not _from_loopback(request):
        return _error(403, "changing the level needs --api-key (or VLLM_API_KEY) when the caller is not on "
                           "this host")
    forged = cross_site_problem(request.headers.get("content-type"), request.headers.get("origin"),
                                request.headers.get("host"))
    if forged:
        return _error(*forged)
    declared = request.headers.get("content-length", "0")
    if not (declared.isascii() and declared.isdigit()):
        return _error(400, "bad Content-Length")
    if len(declared) > 9 or int(declared) > MAX_BODY_BYTES:  # never int() a 4,300-digit header
        return _error(413, f"body must be at most {MAX_BODY_BYTES} bytes")
    raw = b""
    async for chunk in request.stream():  # stop reading at the cap whatever the header said
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            return _error(413, f"body must be at most {MAX_BODY_BYTES} bytes")
    level, problem, key = parse_level_body(raw)
    if problem:
        return _error(400, problem)
    result = await _call(request, "morphserve_set_level", level, True, timeout=LEVEL_TIMEOUT_S)
    if isinstance(result, JSONResponse):
        return result
    if key != "level":
        result["deprecation"] = DEPRECATED_KEY_NOTE
    if not result.get("ok"):
        status = int(result.get("status", 500))
        headers = {"Retry-After": str(max(1, round(result["retry_after_s"])))} if status == 429 else None
        return JSONResponse(result, status_code=status, headers=headers)
    return JSONResponse(result)
