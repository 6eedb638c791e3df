"""What MorphServe needs to know about a Llama-family HF model folder, read without loading it.

Shapes come from config.json and sizes from the safetensors headers, so checking a pack
or a checkpoint against a model costs milliseconds, not a model load. The one full read,
the weight hash, is cached by file stat (see `verified`), so an unchanged model is hashed
once, not at every start.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from quant_layers.cache_dir import cache_root
from quant_layers.errors import QuantLayersError

# The seven linears of a Llama decoder layer, in HF naming; vLLM fuses them into
# qkv_proj and gate_up_proj, which the runtime side maps back.
LINEAR_NAMES = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
SUPPORTED_ARCHS = ("LlamaForCausalLM",)


def linear_key(layer: int, name: str) -> str:
    return f"model.layers.{layer}.{name}"


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    config: dict
    num_layers: int
    linear_shapes: dict[str, tuple[int, int]]  # HF name -> (out_features, in_features)
    weight_files: tuple[Path, ...]
    dtype_bytes: int

    def layer_fp_bytes(self) -> int:
        """Bytes of one decoder layer's linear weights at the model's own dtype (bf16)."""
        return sum(o * i for o, i in self.linear_shapes.values()) * self.dtype_bytes

    def input_sizes(self) -> set[int]:
        return {shape[1] for shape in self.linear_shapes.values()}

    def weights_sha256(self) -> str:
        """Content hash of the weights, so a pack can prove which model it was made from."""
        files = self.weight_files
        return verified("sha256", (*files, self.path / "config.json"), "", lambda: hash_files(files))


def hash_files(files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for file in files:
        h.update(file.name.encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


# A file changed twice within one timestamp tick keeps its stat; results about files this
# young are not cached (git's "racily clean" rule), so such a change is never missed.
RACY_NS = 2_000_000_000


def _stats(files: Sequence[Path]) -> list[list]:
    # ctime as well as mtime: tools that preserve mtime (cp -p, rsync -t) cannot set it
    return [[str(f), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
            for f, st in ((Path(f).resolve(), os.stat(f)) for f in files)]


def verified(kind: str, files: Sequence[Path], key: str, compute: Callable[[], str]) -> str:
    """`compute()`, or its result from an earlier run while `files` are unchanged.

    Start-up verifies the same model in several processes (`morphserve serve`, the
    engine, its workers); for a 70B model each full read is hundreds of GB. The result is
    stored under the MorphServe cache folder with the stat of every file it depends on;
    any change to one (size, mtime, ctime, inode) misses the cache. Stats are taken before
    computing, so a file changed meanwhile is verified again next time; files younger than
    RACY_NS are not cached at all. A cache that cannot be read or written only costs the
    recomputation.
    """
    now = time.time_ns()
    stats = _stats(files)
    name = hashlib.sha256(json.dumps([kind, [s[0] for s in stats], key]).encode()).hexdigest()[:32]
    path = cache_root() / "verified" / f"{kind}-{name}.json"
    try:
        entry = json.loads(path.read_text())
        if entry["stats"] == stats and entry["key"] == key:
            return entry["value"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    value = compute()
    if now - max(max(s[4], s[5]) for s in stats) < RACY_NS:
        return value
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"kind": kind, "key": key, "stats": stats, "value": value}))
        os.replace(tmp, path)  # readers see the old entry or the new one, never half
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return value


def read_model_info(model_dir: Path) -> ModelInfo:
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise QuantLayersError(f"model folder {model_dir} does not exist")
    if not cfg_path.is_file():
        raise QuantLayersError(f"model folder {model_dir} has no config.json (is it a HF model folder?)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise QuantLayersError(f"{cfg_path} is not valid JSON: {e}") from None
    archs = config.get("architectures") or []
    if not any(a in SUPPORTED_ARCHS for a in archs):
        raise QuantLayersError(f"model {model_dir} has architecture {archs}; MorphServe supports {list(SUPPORTED_ARCHS)}")
    if config.get("quantization_config"):
        raise QuantLayersError(f"model {model_dir} is already quantized; give the full-precision model")
    files = tuple(sorted(model_dir.glob("*.safetensors")))
    if not files:
        raise QuantLayersError(f"model folder {model_dir} holds no .safetensors weights")
    hidden = int(config["hidden_size"])
    inter = int(config["intermediate_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads", heads))
    head_dim = int(config.get("head_dim") or hidden // heads)
    shapes = {
        "self_attn.q_proj": (heads * head_dim, hidden),
        "self_attn.k_proj": (kv_heads * head_dim, hidden),
        "self_attn.v_proj": (kv_heads * head_dim, hidden),
        "self_attn.o_proj": (hidden, heads * head_dim),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    return ModelInfo(
        path=model_dir, config=config, num_layers=int(config["num_hidden_layers"]),
        linear_shapes=shapes, weight_files=files,
        dtype_bytes=4 if dtype == "float32" else 2,
    )


def default_group_size(input_sizes: set[int], candidates: tuple[int, ...] = (128, 64, 32)) -> int:
    """The largest of 128, 64, 32 that divides every linear input size (SmolLM2: 576 -> 64)."""
    for g in candidates:
        if all(size % g == 0 for size in input_sizes):
            return g
    raise QuantLayersError(f"no group size in {candidates} divides every input size {sorted(input_sizes)}")


def check_group_size(group_size: int, input_sizes: set[int]) -> None:
    bad = sorted(s for s in input_sizes if s % group_size)
    if bad:
        raise QuantLayersError(
            f"--group-size {group_size} does not divide linear input size(s) {bad}; "
            f"use {default_group_size(input_sizes)} (or leave --group-size unset)"
        )
