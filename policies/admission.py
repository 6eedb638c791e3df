"""Admission: how many requests may run at once at the level served, so that the step each
of them feels stays within the TPOT bound (`admission_cap`), or so that the KV cache holds
what they will need by the time they finish (`kv_admission_cap`).

Why a cap at all: where the CPU, not KV, runs out, every request admitted past some batch
makes every running request's tokens slower, and past the TPOT bound all of them break it,
while the requests it let in sooner were about to break TTFT anyway. Measured on a Zen 4
EPYC (code trace, 329 MB, every system overloaded: suite-v4-zen4): plain bf16 vLLM, whose 19
KV blocks hold a few requests at a time, broke TPOT on 7 of 59 requests and violated on 51;
static W8A8 and MorphServe at all-W8A8, with 54-55 blocks and faster kernels, broke TPOT on
38-39 and violated on 54. Plain vLLM's small KV cache was an admission limit by accident.

vLLM 0.32 has the knob: the scheduler admits into RUNNING only while fewer than
`max_num_active_reqs` run (`--max-num-active-seqs`, below `max_num_seqs`, which sizes the
runner), checked per waiting request, so lowering it preempts nothing. A static limit would
have to be tuned per load and per CPU; here it comes from the step-time model (a kernel
profile measured at start-up, refined by the steps served) at the level in force.

The step a request feels at batch b is `DemandPolicy.step_beside_prompts`'s: the decode step
at b plus each other member's prefill spread over one request's output. The cap is the
largest b whose step meets the bound; none where the level's KV binds first (its batch
already meets the bound), where the model cannot predict the level, or where even one request
alone breaks the bound (a cap would then cost first tokens and save no token's time).
Plain Python, tested in milliseconds.
"""

from __future__ import annotations


def step_at(model, level: int, batch: float, prompt_tokens: float, output_tokens: float) -> float | None:
    """The step a request in a batch of `batch` feels at `level` (the demand policy's
    `step_beside_prompts` at a given batch); None where the model has none."""
    decode = model.predict(level, float(batch))
    if decode is None:
        return None
    if prompt_tokens <= 0 or output_tokens <= 0:
        return decode
    prompt = model.prefill_seconds(level, prompt_tokens)
    return decode if prompt is None else decode + (batch - 1) * prompt / max(1.0, output_tokens)


def admission_cap(model, level: int, bound: float, prompt_tokens: float, output_tokens: float,
                  kv_batch: float) -> int | None:
    """The most requests that may run at once at `level` (None: no cap). `bound`: the TPOT
    bound aimed at (seconds); `kv_batch`: the requests the level's KV holds at once."""
    top = int(kv_batch)
    if model is None or top < 2 or not model.known(level):
        return None

    def meets(batch: int) -> bool | None:
        step = step_at(model, level, batch, prompt_tokens, output_tokens)
        return None if step is None else step <= bound

    if meets(top) is not False or not meets(1):
        return None
    lo, hi = 1, top  # meets(lo) holds, meets(hi) does not; the step grows with the batch
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if meets(mid):
            lo = mid
        else:
            hi = mid
    return lo


def kv_admission_cap(capacity: int, running: int, running_need: int, waiting_needs: tuple[int, ...]) -> int | None:
    """The most requests that may run at once so that none is preempted for KV blocks: the
    running ones, then waiting ones in vLLM's admission order while the blocks all of them
    hold at completion (prompt plus expected output, `need`) fit `capacity`. None: no cap
    (nothing waits, or everything waiting fits).

    Why: vLLM admits a request once its prompt's blocks are free; when the running requests'
    outputs then outgrow the cache it preempts the newest and, on CPU, computes its prompt and
    output again from scratch (measured on the Zen 4 compute row: 9-15 preemptions per run,
    no prefix-cache hit to resume from). Work computed twice is lost throughput where the CPU
    is what runs out. An empty engine always admits one request, whatever it needs (vLLM
    then serves it as it would)."""
    if not waiting_needs:
        return None
    free = capacity - running_need
    admitted = 0
    for need in waiting_needs:
        if need > free:
            break
        free -= need
        admitted += 1
    if admitted == len(waiting_needs):
        return None
    return max(1, running + admitted)
