"""A model worker's settings: the one definition its command line (`chorus worker`), the local
cluster's `spawn_worker` and the Helm chart's worker flags derive from (tests/test_worker_args.py
compares the chart with it). Each field is one `--flag`; its help is the documentation, and its
default is the one the worker's classes take (they read it from here)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes", "on"):
        return True
    if text.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _arg(help: str, **extra: Any) -> dict[str, Any]:
    return {"help": help, **extra}


@dataclass(frozen=True)
class WorkerArgs:
    model: str = field(
        metadata=_arg("model directory, GGUF file (or a directory holding one), catalog:NAME, or hub id", required=True)
    )
    name: str | None = field(default=None, metadata=_arg("model name (default: the directory name)"))
    host: str = field(default="127.0.0.1", metadata=_arg("address to listen on"))
    port: int = field(default=0, metadata=_arg("0 = any free port"))
    device: str = field(default="cpu", metadata=_arg("cpu, cuda, cuda:N or auto"))
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = field(default="auto", metadata=_arg("weights dtype"))
    max_memory: dict[str, Any] | None = field(
        default=None,
        metadata=_arg(
            'accelerate max_memory as JSON, e.g. \'{"0": "24GiB"}\': accelerate places the model over the devices it '
            "lists, in place of --device",
            parse=json.loads,
        ),
    )
    quantization: Literal["none", "8bit", "4bit"] = field(
        default="none", metadata=_arg("load the weights quantized with bitsandbytes (needs CUDA); GGUF is another way")
    )
    max_sessions: int = field(default=64, metadata=_arg("sessions held at once (new ones wait past it)"))
    max_model_len: int = field(default=0, metadata=_arg("tokens a session may hold, prompt included (0 = the model's)"))
    kv_budget_mib: float = field(
        default=0.0,
        metadata=_arg(
            "KV-cache memory: the block pool's size (0 = auto: on CUDA 90%% of the memory free after loading less "
            "room for the largest pass, "
            "elsewhere 4 GiB, at most half the memory the host or container leaves; never more than max-sessions "
            "full contexts)"
        ),
    )
    kv_wait: float = field(
        default=5.0, metadata=_arg("seconds a session waits for free KV blocks before RESOURCE_EXHAUSTED")
    )
    block_size: int = field(default=16, metadata=_arg("positions per KV block (the unit sessions hold and share)"))
    prefix_caching: bool = field(
        default=True,
        metadata=_arg("share the KV blocks of identical token prefixes, keep released ones cached (LRU)", parse=_bool),
    )
    max_batched_tokens: int = field(
        default=512, metadata=_arg("tokens per forward pass: every decode, then prompt chunks of several sessions")
    )
    prefill_chunk: int = field(default=256, metadata=_arg("most prompt tokens of one session per forward pass"))
    decode_stretch: float = field(
        default=1.5,
        metadata=_arg(
            "keep a pass that carries decodes within this many times the engine's estimate of a pass of every "
            "waiting session's decode, by taking fewer prompt tokens into it: sessions that write keep their pace "
            "while a burst of prompts is read, and those prompts wait longer for their first token (0 = off: "
            "prompt chunks fill max-batched-tokens, most throughput)"
        ),
    )
    cuda_graphs: bool = field(
        default=True,
        metadata=_arg("on CUDA, run decode-only passes as captured CUDA graphs (bucketed batch sizes)", parse=_bool),
    )
    session_ttl: float = field(default=600.0, metadata=_arg("reclaim sessions idle this many seconds"))
    tls_cert: Path | None = field(default=None, metadata=_arg("serve TLS with this PEM certificate (and --tls-key)"))
    tls_key: Path | None = field(default=None, metadata=_arg("the certificate's PEM private key"))
    tls_ca: Path | None = field(
        default=None, metadata=_arg("require clients (the coordinator) to present a cert this CA signed")
    )
    metrics_port: int | None = field(
        default=None, metadata=_arg("serve Prometheus metrics on this port (0 = any free one)")
    )
    grace: float = field(default=30.0, metadata=_arg("seconds in-flight sessions get on SIGTERM"))
    port_file: Path | None = field(default=None, metadata=_arg("write the bound port here once serving (supervisors)"))

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-ca needs --tls-cert and --tls-key: client certificates are checked only over TLS")
        if self.decode_stretch != 0 and not self.decode_stretch > 1:
            raise ValueError(f"--decode-stretch: 0 (off) or more than 1, got {self.decode_stretch}")

    @staticmethod
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        for f in dataclasses.fields(cls):
            kind, choices = _kind(f)
            extra: dict[str, Any] = {"required": True} if f.metadata.get("required") else {"default": f.default}
            if choices:
                extra["choices"] = choices
            parser.add_argument(cls.flag(f.name), type=f.metadata.get("parse", kind), help=f.metadata["help"], **extra)

    @classmethod
    def from_namespace(cls, namespace: argparse.Namespace) -> WorkerArgs:
        try:
            return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)})
        except ValueError as e:
            raise SystemExit(str(e)) from None

    @classmethod
    def parse(cls, argv: list[str] | None = None) -> WorkerArgs:
        """From a command line (None: the process's own)."""
        parser = argparse.ArgumentParser(prog="chorus worker", description="Serve one model over gRPC.")
        cls.add_arguments(parser)
        return cls.from_namespace(parser.parse_args(argv))

    def to_argv(self) -> list[str]:
        """The flags that give these settings: the required ones and those that differ from the defaults."""
        argv: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not f.metadata.get("required") and value == f.default:
                continue
            argv += [self.flag(f.name), json.dumps(value) if isinstance(value, dict) else str(value)]
        return argv


def _kind(f: dataclasses.Field[Any]) -> tuple[type, tuple[str, ...]]:
    """The argparse type of a field (its non-None type) and its choices (a Literal's values)."""
    hint = typing.get_type_hints(WorkerArgs)[f.name]
    if get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in get_args(hint) if a is not type(None))
    if get_origin(hint) is Literal:
        return str, tuple(get_args(hint))
    return (hint if isinstance(hint, type) else str), ()
