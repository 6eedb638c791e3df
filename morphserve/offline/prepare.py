"""`morphserve prepare`: build the twins, rank layers by importance, measure quality.

With `--tiers w8a8,w4a16` a W8A8 twin is built beside the W4A16 one; each tier gets its
own importance order, and the tiered ladder (morphserve.offline.ladder) is measured at
every level. `--tiers w8a8` makes a W8A8-only pack (bf16 -> W8A8). The default, `auto`, is
the ladder `morphserve doctor` recommends: the tiers are probed on this CPU before any slow
work, and a tier whose kernels measure too slow here to be worth a rung is left out.

The offline forwards run in bf16 where the CPU has bf16 arithmetic (AVX512_BF16 or AMX)
and in fp32 elsewhere, on weights that hold exactly the bf16 values (torch emulates bf16
there at about a tenth of fp32's speed).

Everything is written into a temporary sibling of PACK_DIR and renamed into place only
when complete, so a failed or interrupted run leaves no partial pack behind.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

import morphserve
from morphserve.doctor.advice import Speed, drop_slow_tiers
from morphserve.offline import pack as packfmt
from morphserve.offline.datafiles import wikitext
from morphserve.errors import MorphServeError
from morphserve.offline.ladder import Ladder
from quant_layers import quality, twin
from quant_layers.eval_windows import load_windows
from quant_layers.importance import MDS_MAX, greedy_lis_order
from quant_layers.layer_runner import BASE, SwitchableModel, mean_cosine
from quant_layers.cpu_kind import this_cpu
from quant_layers.w8_twin import open_w8_twin

W8_DIR = "quantized-w8a8"
from quant_layers.model_info import check_group_size, default_group_size, read_model_info

DEFAULT_CALIB = wikitext("valid")
DEFAULT_EVAL = wikitext("test")


@dataclass
class PrepareOptions:
    model: Path
    out: Path
    bits: int = 4
    group_size: int | None = None  # None: largest of 128/64/32 dividing every input size
    calib: Path = DEFAULT_CALIB
    eval_text: Path = DEFAULT_EVAL
    quantized: Path | None = None
    eval_tokens: int = 8184
    eval_window: int = 1024
    lis_tokens: int = 1024
    lis_window: int = 256
    gptq_samples: int = 32
    gptq_seq_len: int = 512
    force: bool = False
    threads: int | None = None
    tiers: str = "auto"  # auto: the tiers whose kernels run here, less any too slow to be a rung
    probe: Callable[[list[str]], dict[str, str | None]] | None = None  # tier -> None, or why not here
    # (model info, tiers, group size) -> each tier's measured kernel speed here (doctor.advice.Speed);
    # read by `auto` only when more than one tier runs
    speed: Callable[[object, list[str], int], Speed] | None = None
    compute_dtype: str = "auto"  # auto: bf16 with native bf16 arithmetic, else fp32
    w8a8_method: str = "gptq"
    w4a16_method: str = "gptq"  # or "rtn": round-to-nearest, for quick packs on CPUs that never serve W4A16
    w8a8_order: str = "lis"  # or "w4a16": reuse the base tier's order
    quantized_w8a8: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)


def _log(msg: str) -> None:
    print(f"[prepare] {msg}", file=sys.stderr, flush=True)


TIER_CHOICES = ("auto", "w4a16", "w8a8", "w8a8,w4a16")


def _parse_tiers(text: str) -> list[str]:
    """The tiers named in --tiers, least compressed first ([] for auto)."""
    if text.strip() == "auto":
        return []
    tiers = [t.strip() for t in text.split(",") if t.strip()]
    ordered = [t for t in packfmt.TIER_NAMES if t in tiers]
    if ",".join(ordered) not in TIER_CHOICES or len(ordered) != len(tiers):
        raise MorphServeError(f"--tiers {text!r}: give 'w4a16', 'w8a8' or 'w8a8,w4a16' (or 'auto'; "
                              f"known tiers: {', '.join(packfmt.TIER_NAMES)})")
    return ordered


def _resolve_tiers(opt: PrepareOptions, info=None) -> list[str]:
    """The tiers to build: those asked for, each probed on this CPU first. `auto` is the
    ladder `morphserve doctor` recommends: the tiers whose kernels run here (W8A8 only on a
    CPU without a W4A16 kernel), less a tier whose measured kernels are too slow to be worth
    a rung (`doctor.advice.drop_slow_tiers`). Given checkpoints (`--quantized`,
    `--quantized-w8a8`) make `auto` their tiers, as they run here: a user who brings a twin
    expects no quantization run (and may have no llm-compressor environment), and every
    twin brought is used."""
    verdict = opt.probe(list(packfmt.TIER_NAMES)) if opt.probe is not None else {}
    if opt.tiers.strip() == "auto":
        given = [t for t, ckpt in (("w8a8", opt.quantized_w8a8), ("w4a16", opt.quantized)) if ckpt is not None]
        tiers = [t for t in packfmt.TIER_NAMES if verdict.get(t) is None and (not given or t in given)]
        tiers = tiers or given or ["w8a8"]  # none runs here: refused below, naming why
        if verdict.get(packfmt.BASE_TIER) is not None and not given:
            _log(f"W4A16 does not run here ({verdict[packfmt.BASE_TIER]}); preparing a W8A8-only pack")
        if len(tiers) > 1 and not given and opt.speed is not None and info is not None:
            speed = opt.speed(info, tiers, opt.group_size)
            tiers, dropped = drop_slow_tiers(tiers, speed)
            for why in dropped:
                _log(f"{why} ({speed.source}); --tiers {','.join(packfmt.TIER_NAMES)} builds it anyway")
        _log(f"--tiers auto: {','.join(tiers)}" + (" (the tiers of the checkpoints given)" if given else ""))
    else:
        tiers = _parse_tiers(opt.tiers)
    runs = [t for t in tiers if verdict.get(t) is None]
    if not runs:
        raise MorphServeError(f"this CPU cannot serve a {'/'.join(tiers)} pack: {verdict[tiers[-1]]}"
                              + ("; use --tiers w8a8" if "w8a8" not in tiers else ""))
    for t in tiers:
        if t not in runs:
            _log(f"warning: this CPU will serve the pack without its {t} tier: {verdict[t]}")
    return tiers


def _check_inputs(opt: PrepareOptions):
    if opt.bits != twin.SERVED_BITS:
        raise MorphServeError(f"--bits {opt.bits} is not supported: {twin.SERVED}")
    _parse_tiers(opt.tiers)  # a typo fails before the probe loads vLLM
    info = read_model_info(opt.model)
    twin.index_safetensors(Path(opt.model))  # a corrupt weight file fails here, not after GPTQ
    if opt.group_size is None:
        opt.group_size = default_group_size(info.input_sizes())
    else:
        check_group_size(opt.group_size, info.input_sizes())
    for what, path in (("calibration text", opt.calib), ("evaluation text", opt.eval_text)):
        if not Path(path).is_file():
            raise MorphServeError(f"{what} {path} does not exist")
    out = Path(opt.out)
    if out.exists() and any(out.iterdir()) and not opt.force:
        raise MorphServeError(f"{out} already exists and is not empty; pass --force to replace it")
    # The checkpoints given are checked before the probe: it loads vLLM, which prints its own
    # notices, and a bad checkpoint should cost one error line and no seconds.
    if opt.quantized is not None:
        twin.check_servable_twin(twin.open_twin(opt.quantized, info))  # fail before any slow work
    if opt.quantized_w8a8 is not None:
        open_w8_twin(opt.quantized_w8a8, info)
    opt.tiers = ",".join(_resolve_tiers(opt, info))
    if opt.quantized is not None and opt.tiers == "w8a8":
        raise MorphServeError("--quantized is a W4A16 checkpoint; a W8A8-only pack (--tiers w8a8) has none")
    if opt.quantized_w8a8 is not None and "w8a8" not in opt.tiers.split(","):
        raise MorphServeError("--quantized-w8a8 needs --tiers w8a8 or w8a8,w4a16")
    return info


def _copy_checkpoint(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for item in Path(src).iterdir():
        if item.is_file():
            shutil.copy2(item, dst / item.name)


# Layer inputs kept for one round's measured candidates (a 1,024-token search: 2.4 MB a layer in fp32).
CANDIDATE_STATE_BYTES = 1 << 30


def _importance(model: SwitchableModel, windows, num_layers: int, tier: str = BASE, base_name: str = "w4a16"):
    """`base_name`: what the base tier is (W4A16, or W8A8 in a W8A8-only pack), for the progress bar."""
    ids = torch.tensor(windows.windows)
    model.set_quantized(())
    fp_inputs = model.layer_inputs(ids)
    lts, lrs = {}, {}
    for p in tqdm(range(num_layers), desc="LTS/LRS", file=sys.stderr):
        x = fp_inputs[p]
        out_fp = fp_inputs[p + 1]
        model.set_config({p: tier})
        out_q = model.run_layer(p, x)
        lts[p] = mean_cosine(out_fp, x)
        lrs[p] = mean_cosine(out_fp, out_q)
    model.set_quantized(())

    bar = tqdm(total=num_layers * (num_layers + 1) // 2, desc=f"greedy MDS ({tier if tier != BASE else base_name})",
               file=sys.stderr)

    # The last round's Q and its layer inputs, and the layer inputs of every candidate
    # measured against them: the next round's Q is one of those candidates, whose inputs
    # are then known without a forward (the same tensors a rerun would compute).
    # `reference`: the final hidden state under Q, which every candidate of a round is compared with.
    held: dict = {"q": frozenset(), "inputs": fp_inputs, "reference": model.final(fp_inputs[-1]),
                  "candidates": {}, "bytes": 0}

    def mds_for_round(q: frozenset[int], candidates) -> dict[int, float]:
        if q != held["q"]:
            added = q - held["q"]
            kept = held["candidates"].get(next(iter(added))) if len(added) == 1 and held["q"] < q else None
            model.set_config({i: tier for i in q})
            # else: the last round's inputs, rerun from the first layer whose tier changed
            held["inputs"] = kept or model.layer_inputs(ids, known=held["inputs"], start=min(q ^ held["q"]))
            held.update(q=q, reference=model.final(held["inputs"][-1]), candidates={}, bytes=0)
        inputs, reference = held["inputs"], held["reference"]
        mds = {}
        for p in candidates:
            model.set_config({i: tier for i in q | {p}})
            states = model.layer_inputs(ids, known=inputs, start=p)
            mds[p] = mean_cosine(reference, model.final(states[-1]))
            new_bytes = sum(t.numel() * t.element_size() for t in states[p + 1:])
            if held["bytes"] + new_bytes <= CANDIDATE_STATE_BYTES:
                held["candidates"][p] = states
                held["bytes"] += new_bytes
            bar.update(1)
        model.set_config({i: tier for i in q})
        return mds

    result = greedy_lis_order(list(range(num_layers)), lts, lrs, mds_for_round, mds_bound=MDS_MAX,
                              on_round=lambda rnd: bar.update(len(rnd.skipped)))  # those no forward needed
    bar.close()
    model.set_quantized(())
    return result


def run_prepare(opt: PrepareOptions) -> packfmt.Manifest:
    t_start = time.monotonic()
    info = _check_inputs(opt)
    out = Path(opt.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tiers = opt.tiers.split(",")
        w8, w8_source = _w8_twin(opt, tmp, info) if "w8a8" in tiers else (None, "")
        tw, source = _w4_twin(opt, tmp, info) if packfmt.BASE_TIER in tiers else (None, "")
        dtype = compute_dtype(opt.compute_dtype)
        t = time.monotonic()
        if tw is not None:  # the base tier is W4A16; W8A8, if any, is a further tier
            base = lambda i: tw.dequantized_layer(i, torch.bfloat16)  # noqa: E731
            extra = {"w8a8": lambda i: w8.dequantized_layer(i, torch.bfloat16)} if w8 else {}
            act_quant = frozenset(extra)
        else:  # a W8A8-only pack: W8A8 is the base tier
            base, extra, act_quant = (lambda i: w8.dequantized_layer(i, torch.bfloat16)), {}, frozenset({BASE})
        _log(f"offline forwards in {str(dtype).removeprefix('torch.')} ({this_cpu().describe()})")
        model = SwitchableModel(opt.model, base, info.num_layers, threads=opt.threads, tiers=extra,
                                act_quant_tiers=act_quant, compute_dtype=dtype)
        tokenizer = _tokenizer(opt.model)
        opt.timings["load"] = time.monotonic() - t

        t = time.monotonic()
        calib = load_windows(opt.calib, tokenizer, opt.lis_window, opt.lis_tokens)
        _log(f"layer importance on {len(calib.windows)} x {opt.lis_window} calibration tokens")
        importance = _importance(model, calib, info.num_layers, base_name="w4a16" if tw is not None else "w8a8")
        w8_importance = None
        if w8 is not None and tw is not None:
            w8_importance = (_importance(model, calib, info.num_layers, "w8a8") if opt.w8a8_order == "lis"
                             else importance)
        opt.timings["importance"] = time.monotonic() - t

        manifest = _manifest(opt, info, importance.order, (tw, source), (w8, w8_source),
                             w8_importance.order if w8_importance is not None else None)
        further = manifest.tiers
        ladder = Ladder.from_manifest(manifest) if further else None

        t = time.monotonic()
        evalw = load_windows(opt.eval_text, tokenizer, opt.eval_window, opt.eval_tokens)
        _log(f"perplexity on {evalw.scored_tokens} tokens ({len(evalw.windows)} x {opt.eval_window})")
        # With tiers, the served ladder is measured at every level below; the W4A16-only curve
        # is served only where a CPU runs W4A16 and not W8A8, so it is measured where the
        # report and the ladder's check read it, and filled towards the dearer side between.
        lis_points = [quality.w4_layers_freeing_as_much(ladder)] if further else None
        qual = quality.quality_curves(model, evalw, importance.order, opt.eval_text, opt.eval_window, lis_points)
        qual["compute_dtype"] = str(dtype).removeprefix("torch.")
        opt.timings["quality"] = time.monotonic() - t

        if further:
            t = time.monotonic()
            _log(f"tiered ladder: perplexity at each of {2 * info.num_layers} levels")
            qual.update(quality.tier_curves(model, evalw, ladder, w8_importance.order,
                                            qual["orders"]["lis"]["ppl"]))
            if not qual["ladder"]["check"]["ladder_cheaper"]:
                _log("warning: at the bytes all-W8A8 frees, W4A16 alone costs less perplexity on this model; "
                     "the ladder (W8A8 first) is not the cheaper path here (quality.json ladder.check)")
            opt.timings["quality"] += time.monotonic() - t
        opt.timings["total"] = time.monotonic() - t_start
        manifest.timings_s = {k: round(v, 1) for k, v in opt.timings.items()}
        imp = importance.to_json()
        if w8_importance is not None:
            imp["tiers"] = {"w8a8": w8_importance.to_json() if w8_importance is not importance
                            else {"order_from": "w4a16", "order": importance.order}}
        packfmt.write_json(tmp / packfmt.IMPORTANCE, imp)
        packfmt.write_json(tmp / packfmt.QUALITY, qual)
        packfmt.write_json(tmp / packfmt.MANIFEST, manifest.model_dump())
        _publish(tmp, out)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _manifest(opt: PrepareOptions, info, order: list[int], w4, w8, w8_order: list[int] | None) -> packfmt.Manifest:
    """The pack's manifest, before its curves are measured (the ladder they follow is read
    from it). `w4`, `w8`: (checkpoint or None, its source)."""
    (tw, source), (w8_twin, w8_source) = w4, w8
    further = []
    if w8_order is not None:
        further.append(packfmt.TierManifest(
            name="w8a8", format=packfmt.TIER_FORMATS["w8a8"], quantized_dir=W8_DIR,
            quantization_source=w8_source, swap_order=w8_order,
            layer_bytes=[w8_twin.layer_bytes(i) for i in range(info.num_layers)]))
    if tw is not None:
        base_fields = dict(bits=opt.bits, group_size=opt.group_size, quantization_source=source,
                           layer_bytes=[packfmt.LayerBytes(layer=i, fp16=info.layer_fp_bytes(),
                                                           quantized=tw.layer_bytes(i))
                                        for i in range(info.num_layers)])
    else:
        base_fields = dict(base_tier="w8a8", bits=8, group_size=0, format=packfmt.TIER_FORMATS["w8a8"],
                           quantized_dir=W8_DIR, quantization_source=w8_source,
                           layer_bytes=[packfmt.LayerBytes(layer=i, fp16=info.layer_fp_bytes(),
                                                           quantized=w8_twin.layer_bytes(i))
                                        for i in range(info.num_layers)])
    return packfmt.Manifest(
        tool_version=morphserve.__version__,
        model_path=str(Path(opt.model).resolve()),
        model_sha256=info.weights_sha256(),
        architecture=info.config["architectures"][0],
        num_layers=info.num_layers, swap_order=order, tiers=further, **base_fields,
    )


def _w4_twin(opt: PrepareOptions, tmp: Path, info):  # -> (TwinCheckpoint, source)
    """The W4A16 twin in tmp/quantized: llm-compressor GPTQ, or --quantized."""
    qdir = tmp / packfmt.QUANTIZED_DIR
    t = time.monotonic()
    if opt.quantized is not None:
        _log(f"using existing W{opt.bits}A16 checkpoint {opt.quantized}")
        _copy_checkpoint(opt.quantized, qdir)
        source = str(Path(opt.quantized).resolve())
    else:
        rtn = opt.w4a16_method == "rtn"
        _log(f"{'round-to-nearest' if rtn else 'GPTQ'} W{opt.bits}A16 g{opt.group_size} via llm-compressor"
             + ("" if rtn else f" ({opt.gptq_samples} x {opt.gptq_seq_len} calibration tokens)"))
        twin.run_gptq(opt.model, qdir, opt.bits, opt.group_size, opt.calib, opt.gptq_samples, opt.gptq_seq_len,
                      method=opt.w4a16_method,
                      # round-to-nearest weights depend on no forward: bf16 keeps them byte for byte
                      compute_dtype="bf16" if rtn else calibration_dtype(opt.compute_dtype))
        source = "rtn (llm-compressor W4A16)" if rtn else "gptq (llm-compressor)"
    opt.timings["quantize"] = time.monotonic() - t
    tw = twin.open_twin(qdir, info)
    if tw.bits != opt.bits or tw.group_size != opt.group_size:
        if opt.quantized is None:
            raise MorphServeError(f"llm-compressor wrote W{tw.bits} g{tw.group_size}, expected W{opt.bits} g{opt.group_size}")
        _log(f"checkpoint is W{tw.bits} g{tw.group_size}; recording that in the manifest")
        opt.bits, opt.group_size = tw.bits, tw.group_size
    return tw, source


def compute_dtype(choice: str, measure: "Callable[[torch.dtype], float] | None" = None) -> torch.dtype:
    """The dtype of the offline forwards, on the same bf16 weight values either way. `auto`:
    fp32 where the CPU has no bf16 arithmetic (torch emulates it, ~10x slower); elsewhere
    whichever of bf16 and fp32 a matmul of the offline forwards' shape runs faster here
    (measured on a 2-core AVX512_BF16 Xeon, fp32 made the whole small prepare 1.46x faster:
    having bf16 instructions is not the same as bf16 being faster), bf16 on a near tie
    (within 10%), as the serving engine computes in bf16."""
    if choice != "auto":
        return {"bf16": torch.bfloat16, "fp32": torch.float32}[choice]
    if not this_cpu().native_bf16:
        return torch.float32
    measure = measure or matmul_seconds
    bf16, fp32 = measure(torch.bfloat16), measure(torch.float32)
    return torch.float32 if fp32 < 0.9 * bf16 else torch.bfloat16


def calibration_dtype(choice: str) -> str:
    """The dtype of llm-compressor's calibration forwards: fp32 where asked, or where the CPU
    has no bf16 arithmetic (its GPTQ there was 12 minutes of a default prepare on a 2-core
    AVX2 EPYC, nearly all emulated bf16 forwards); bf16 elsewhere, so the twins on machines
    with bf16 instructions stay the ones their curves were measured with."""
    if choice == "fp32" or (choice == "auto" and not this_cpu().native_bf16):
        return "fp32"
    return "bf16"


def matmul_seconds(dtype: torch.dtype, m: int = 1024, k: int = 576, n: int = 1536, repeats: int = 5) -> float:
    """Median time of one [m, k] x [k, n] matmul (a 1,024-token window through an MLP
    projection of a small Llama): tens of milliseconds in all."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b  # warm-up: oneDNN/MKL pick and JIT their kernel on the first call
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _w8_twin(opt: PrepareOptions, tmp: Path, info):  # -> (W8Checkpoint, source)
    """The W8A8 twin in tmp/quantized-w8a8: llm-compressor's W8A8 preset, or --quantized-w8a8."""
    qdir = tmp / W8_DIR
    t = time.monotonic()
    if opt.quantized_w8a8 is not None:
        _log(f"using existing W8A8 checkpoint {opt.quantized_w8a8}")
        _copy_checkpoint(opt.quantized_w8a8, qdir)
        source = str(Path(opt.quantized_w8a8).resolve())
    else:
        _log(f"W8A8 ({opt.w8a8_method}) via llm-compressor ({opt.gptq_samples} x {opt.gptq_seq_len} calibration tokens)")
        twin.run_gptq(opt.model, qdir, 8, None, opt.calib, opt.gptq_samples, opt.gptq_seq_len,
                      scheme="w8a8", method=opt.w8a8_method,
                      # round-to-nearest weights depend on no forward: its twin stays byte for byte the bf16 run's
                      compute_dtype="bf16" if opt.w8a8_method == "rtn" else calibration_dtype(opt.compute_dtype))
        source = f"{opt.w8a8_method} (llm-compressor W8A8)"
    opt.timings["quantize_w8a8"] = time.monotonic() - t
    return open_w8_twin(qdir, info), source

AT_FDCWD = -100
RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where
    that is unavailable: not Linux, a libc without renameat2, or ENOSYS/EINVAL from a
    kernel or filesystem that cannot exchange."""
    if sys.platform != "linux":
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    renameat2.restype = ctypes.c_int
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _publish(tmp: Path, out: Path) -> None:
    """Put the finished pack at `out` so that a crash at any moment leaves a whole pack there.

    Replacing an existing pack (--force) is one atomic exchange of the two folders, after
    which the old pack sits at `tmp` and is deleted. Without renameat2 it falls back to two
    renames (old aside, new in), which leaves no pack at `out` if the process dies between
    them: the best POSIX rename offers, since it cannot replace a non-empty folder.
    The new pack's files are flushed to disk first, so that "whole" also holds after a
    power loss, not only after a killed process.
    """
    _fsync_tree(tmp)
    if out.exists() and _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True) + [root, root.parent]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
