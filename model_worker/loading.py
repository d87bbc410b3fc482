"""Load a Hugging Face causal LM directory (or hub id) the way real models are loaded."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Files over this size are fingerprinted by size plus head and tail, not read whole.
_FULL_HASH_LIMIT = 64 << 20
_EDGE = 1 << 20


@dataclass
class LoadedModel:
    name: str
    model: Any  # transformers PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str
    device: torch.device
    dtype: torch.dtype
    context_length: int


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto' means float32 on CPU and bfloat16 on CUDA (where it is supported)."""
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: unknown {dtype!r}, expected auto or one of {sorted(_DTYPES)}")
        return _DTYPES[dtype]
    if (device.startswith("cuda") or device == "auto") and torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def fingerprint(path: Path) -> str:
    """sha256 over the model directory's weights, config and tokenizer files."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if rel.startswith(".") or rel.endswith(".md"):
            continue
        size = file.stat().st_size
        digest.update(f"{rel}\0{size}\0".encode())
        with file.open("rb") as fh:
            if size <= _FULL_HASH_LIMIT:
                digest.update(fh.read())
            else:
                digest.update(fh.read(_EDGE))
                fh.seek(size - _EDGE)
                digest.update(fh.read(_EDGE))
    return digest.hexdigest()


def load_model(
    path: str,
    *,
    name: str | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    max_memory: dict[str | int, str] | None = None,
) -> LoadedModel:
    """Load model and tokenizer; device 'auto' or a max_memory map goes through accelerate."""
    torch_dtype = resolve_dtype(dtype, device)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if device == "auto" or max_memory:
        kwargs["device_map"] = "auto"
        if max_memory:
            kwargs["max_memory"] = max_memory
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if "device_map" not in kwargs:
        model.to(device)
    model.eval()
    first_device = next(model.parameters()).device
    local = Path(path)
    fp = fingerprint(local) if local.is_dir() else hashlib.sha256(path.encode()).hexdigest()
    context = int(
        getattr(model.config, "max_position_embeddings", 0)
        or getattr(model.config, "n_positions", 0)
        or getattr(tokenizer, "model_max_length", 0)
        or 2048
    )
    log.info("loaded %s on %s as %s (context %d)", path, first_device, torch_dtype, context)
    return LoadedModel(
        name=name or local.name,
        model=model,
        tokenizer=tokenizer,
        fingerprint=fp,
        device=first_device,
        dtype=torch_dtype,
        context_length=context,
    )
