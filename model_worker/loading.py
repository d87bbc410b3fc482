"""Load a causal LM the way real models are loaded: a Hugging Face directory, a hub id, or a GGUF file
(or a directory holding one), which transformers dequantizes (package `gguf`)."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from model_worker import catalog

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


def gguf_file(path: Path) -> Path | None:
    """The GGUF file to load: path itself, or the only one in a directory without a config.json."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise ValueError(f"model: {path} holds several GGUF files ({', '.join(f.name for f in found)}); name one")
        if found:
            return found[0]
    return None


class WeightsUnreadable(PermissionError):
    """A model file or folder this process may not read (transformers would call the file missing)."""


def check_readable(path: Path) -> None:
    """Every folder and file of a local model is readable by this process's user, else WeightsUnreadable
    naming the first that is not, the uid reading it and the fix."""
    if path.is_file():
        _check_access(path, path)
        return
    _check_access(path, path)
    for folder, dirs, files in os.walk(path):
        for name in sorted(dirs) + sorted(files):
            _check_access(Path(folder, name), path)


def _check_access(item: Path, root: Path) -> None:
    wanted = os.R_OK | (os.X_OK if item.is_dir() else 0)
    if os.access(item, wanted):
        return
    info = item.stat()
    what = "folder" if item.is_dir() else "file"
    raise WeightsUnreadable(
        f"cannot read the model {what} {item} as uid {os.getuid()} (gid {os.getgid()}): it is "
        f"{stat.filemode(info.st_mode)}, owned by uid {info.st_uid} gid {info.st_gid}. Make the weights "
        f"readable by the worker's user (e.g. chmod -R a+rX {root}), or run the worker as their owner "
        "(in Kubernetes: the pod's securityContext runAsUser / fsGroup)"
    )


def _bitsandbytes(quantization: str, device: str) -> Any:
    if quantization not in ("8bit", "4bit"):
        raise ValueError(f"quantization: unknown {quantization!r}, expected none, 8bit or 4bit")
    if not (device.startswith("cuda") or device == "auto") or not torch.cuda.is_available():
        raise ValueError(
            f"quantization: {quantization} needs a CUDA device (bitsandbytes); this worker runs on {device}. "
            "Use quantization: none, or serve a quantized GGUF file (path: model.gguf)"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"quantization: {quantization} needs the bitsandbytes package (pip install bitsandbytes)")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=quantization == "8bit", load_in_4bit=quantization == "4bit")


def fingerprint(path: Path) -> str:
    """sha256 over the model directory's weights, config and tokenizer files (or over one file)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        rel = file.name if path.is_file() else file.relative_to(path).as_posix()
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


# What some of transformers' tokenizer classes (Gemma's, among 25) keep of the vocabulary and merges they
# built their Rust backend from: read only in their __init__, they are Python copies of what the backend
# holds (for Gemma 3's 262,144 tokens and 514,906 merges, about 150 MB of a worker's resident memory).
_BUILD_TABLES = ("_vocab", "_merges")


def drop_build_tables(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The tokenizer without the Python copies of its vocabulary and merges that only built its backend."""
    if getattr(tokenizer, "_tokenizer", None) is None:  # no Rust backend: the tables are the tokenizer
        return tokenizer
    for attr in _BUILD_TABLES:
        table = getattr(tokenizer, attr, None)
        if isinstance(table, dict | list) and table:
            setattr(tokenizer, attr, type(table)())
    return tokenizer


def load_model(
    path: str,
    *,
    name: str | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    max_memory: dict[str | int, str] | None = None,
    max_model_len: int = 0,
    quantization: str = "none",
) -> LoadedModel:
    """Load model and tokenizer; device 'auto' or a max_memory map goes through accelerate.
    max_model_len (0 = the model's own) caps the context a session may fill; quantization 8bit/4bit
    loads the weights with bitsandbytes (CUDA only) or is refused, never ignored."""
    torch_dtype = resolve_dtype(dtype, device)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if quantization != "none":  # bitsandbytes places the weights itself
        kwargs["quantization_config"] = _bitsandbytes(quantization, device)
        kwargs["device_map"] = "auto" if device == "auto" else {"": device}
    if device == "auto" or max_memory:
        kwargs["device_map"] = "auto"
        if max_memory:
            kwargs["max_memory"] = max_memory
    path = catalog.resolve(path)
    local = Path(path)
    if local.exists():
        check_readable(local)
    source, gguf = path, gguf_file(local)
    if gguf is not None:  # dequantized by transformers to the dtype asked for
        source, kwargs["gguf_file"] = str(gguf.parent), gguf.name
    tokenizer = drop_build_tables(AutoTokenizer.from_pretrained(source, **({"gguf_file": gguf.name} if gguf else {})))
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if "device_map" not in kwargs:
        model.to(device)
    model.eval()
    first_device = next(model.parameters()).device
    fp = fingerprint(gguf or local) if gguf or local.is_dir() else hashlib.sha256(path.encode()).hexdigest()
    context = int(
        getattr(model.config, "max_position_embeddings", 0)
        or getattr(model.config, "n_positions", 0)
        or getattr(tokenizer, "model_max_length", 0)
        or 2048
    )
    if max_model_len < 0:
        raise ValueError(f"max_model_len: {max_model_len} must be >= 0 (0 = the model's own {context})")
    if max_model_len:
        context = min(context, max_model_len)
    log.info("loaded %s on %s as %s (context %d)", path, first_device, torch_dtype, context)
    return LoadedModel(
        name=name or (gguf.stem if gguf is not None and local.is_file() else local.name),
        model=model,
        tokenizer=tokenizer,
        fingerprint=fp,
        device=first_device,
        dtype=torch_dtype,
        context_length=context,
    )
