"""The ensemble configuration: one immutable object, loaded and validated in one place.

Two file formats are accepted:

* the native format (lower-case keys: ``strategy``, ``weights``, ``models`` ...), and
* GaC's own format (``NORM_TYPE_API_SERVER``, ``THRESHOLD_API_SERVER``,
  ``CONFIG_API_SERVER``), loaded unchanged and with GaC's meaning: a model with
  priority ``primary`` means strategy ``threshold``, all ``supportive`` means ``gac``
  (every token ensembled, threshold unused).

Every problem is reported as one line ``<key path>: <what is wrong>``; the key path is
the one written in the user's file (``models[1].score``, ``CONFIG_API_SERVER[0].weight``).
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from coordinator.strategies import SECTIONS, STRATEGIES
from coordinator.strategies.settings import Loc
from coordinator.strategies.settings import Section as _Section

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"

GAC_KEYS = ("NORM_TYPE_API_SERVER", "THRESHOLD_API_SERVER", "CONFIG_API_SERVER")
_GAC_MODEL_KEYS = ("weight", "name", "score", "priority", "max_memory", "num_gpus", "quantization")
# native key -> GaC key, used to report problems under the name the user wrote
_GAC_TOP = {
    "weights": "NORM_TYPE_API_SERVER",
    "threshold": "THRESHOLD_API_SERVER",
    "models": "CONFIG_API_SERVER",
}

_DEVICE_RE = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")
_SIZE_RE = re.compile(r"^\d+(\.\d+)?\s*[KMGT]i?B$", re.IGNORECASE)
_ADDRESS_RE = re.compile(r"^(?P<host>\S+):(?P<port>\d+)$")
_MEMORY_DEVICES = ("cpu", "disk", "mps")


class ConfigError(ValueError):
    """An invalid configuration; ``problems`` holds one ``key.path: message`` line each."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__("\n".join(prefix + p for p in self.problems))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.problems, self.source))


class _CrossFieldError(ValueError):
    """Cross-field problems raised inside a validator, each with its own key path."""

    def __init__(self, problems: list[tuple[Loc, str]]) -> None:
        self.problems = problems
        super().__init__("\n".join(f"{_format_loc(loc)}: {msg}" for loc, msg in problems))


class Transport(_Section):
    """How workers ship next-token distributions to the coordinator."""

    top_k: int = Field(0, ge=0)  # 0 = full distributions
    dtype: Literal["float16", "float32"] = "float16"


class RequestDefaults(_Section):
    """Per-request sampling defaults the coordinator applies when a request omits them."""

    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0 = no top-k cut
    apply_chat_template: bool = False
    on_worker_loss: Literal["fail", "degrade"] = "fail"  # degrade: go on with the models left


class Limits(_Section):
    max_new_tokens: int = Field(4096, ge=1)
    max_conversations: int = Field(64, ge=1)
    max_prompt_bytes: int = Field(1_000_000, ge=1)
    # Conversations generated at once; past it requests get RESOURCE_EXHAUSTED at once (retryable).
    max_running: int = Field(256, ge=1)
    # A worker that has answered before and takes longer than this for a step (or 4x its slowest
    # step so far) is declared lost; a first step (the prefill) and opening get the longer budget.
    step_timeout_s: float = Field(1.0, gt=0)
    first_step_timeout_s: float = Field(60.0, gt=0)
    # A replica that refuses a request's session (shutting down in a rolling restart, or gone) hands it to
    # another replica of the model; with none ready, the request waits this long for one to join (the
    # restart's successor), then fails with UNAVAILABLE. 0 = at once.
    replica_wait_s: float = Field(5.0, ge=0)


class Server(_Section):
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(50051, ge=0, le=65535)  # 0 = any free port
    tls_cert: str | None = None  # PEM files: serve TLS to clients
    tls_key: str | None = None
    client_ca: str | None = None  # clients must then present a certificate this CA signed
    tokens_file: str | None = None  # bearer tokens clients must send, one per line
    # Seconds after which a client connection is sent GOAWAY, so clients reconnect and re-resolve:
    # long-lived clients spread over coordinator replicas (chorus_common.serving.DEFAULT_MAX_CONNECTION_AGE_S).
    # null = connections live as long as clients keep them.
    max_connection_age_s: float | None = Field(300.0, gt=0, le=2_000_000)
    # How long calls in flight may go on after that; null = until they end (generations are never cut).
    max_connection_age_grace_s: float | None = Field(None, gt=0, le=2_000_000)

    @model_validator(mode="after")
    def _tls_pair(self) -> Server:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.client_ca is not None and self.tls_cert is None:
            raise ValueError("client_ca needs tls_cert and tls_key")
        return self


class WorkerTls(_Section):
    """How the coordinator reaches workers that serve TLS (mutual TLS when they require a client cert)."""

    ca: str = Field(min_length=1)  # the CA that signed the workers' certificates
    cert: str = Field(min_length=1)  # the coordinator's client certificate and key
    key: str = Field(min_length=1)
    # The name the workers' certificate is checked against (workers are dialled by pod IP, so one
    # shared certificate names the service instead); None = the address's host.
    server_name: str | None = Field(None, min_length=1)


class Http(_Section):
    """The OpenAI- and GaC-compatible HTTP APIs, served by the coordinator process."""

    enabled: bool = False
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8000, ge=0, le=65535)  # 0 = any free port
    # TLS on the HTTP port: by default the gRPC server's (server.tls_cert, tls_key, client_ca); these
    # give HTTP its own. Bearer tokens are always server.tokens_file's, the same as gRPC's.
    tls_cert: str | None = None
    tls_key: str | None = None
    client_ca: str | None = None

    @model_validator(mode="after")
    def _tls_pair(self) -> Http:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.client_ca is not None and self.tls_cert is None:
            raise ValueError("client_ca needs tls_cert and tls_key (without them HTTP uses server's TLS)")
        return self


class Discovery(_Section):
    """Where the coordinator finds workers: fixed addresses, or pods found through the Kubernetes API."""

    mode: Literal["static", "kubernetes"] = "static"
    namespace: str | None = None  # kubernetes: default the coordinator pod's own namespace
    label_selector: str = "app.kubernetes.io/component=worker"
    model_label: str = Field("chorus.dev/model", min_length=1)  # pod label naming the model (models[].name)
    port_name: str = "grpc"  # the worker container's port of this name; else `port`
    port: int = Field(50061, ge=1, le=65535)


# ModelSpec keys only the worker `chorus up` starts reads (its flags of the same names).
LOADING_KEYS = ("device", "dtype", "quantization", "max_memory", "max_model_len", "kv_budget_mib")


class ModelSpec(_Section):
    """One ensemble member.

    ``path`` is a local Hugging Face directory or a hub id. When loaded through
    :func:`parse_config`, local paths are made absolute (see :func:`_resolve_model_path`);
    constructing a ``ModelSpec`` directly keeps ``path`` verbatim. A model served by a running worker
    (an ``address``, or pods found by Kubernetes discovery) needs no path: the coordinator never loads it.
    """

    name: str = Field(min_length=1)  # defaults to the last component of path
    path: str | None = Field(None, min_length=1)  # required where `chorus up` starts the worker
    address: str | None = None  # host:port of a running worker; None = spawned by `chorus up`
    score: float | None = Field(None, gt=0)  # required when weights == "score"
    priority: Literal["primary", "supportive"] = "supportive"
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    quantization: Literal["none", "8bit", "4bit"] = "none"  # GaC key; the worker needs CUDA and bitsandbytes
    max_memory: dict[int | str, int | str] | None = None  # accelerate format
    max_model_len: int = Field(0, ge=0)  # tokens a session may hold, prompt included; 0 = the model's context
    # The KV pool of the worker `chorus up` starts (its --kv-budget-mib; 0 = auto). On CPU it bounds what the
    # prefix cache keeps resident; a worker at an address has its own flag.
    kv_budget_mib: float = Field(0.0, ge=0.0)
    num_gpus: float | None = Field(None, ge=0)  # GaC key; informational
    # Calibration: the member's next-token distribution is taken to the power 1/temperature (and
    # renormalised) before any strategy sees it; 1 = as the model gives it. `chorus tune` fits it.
    temperature: float = Field(1.0, gt=0.0, le=100.0)

    def loading_settings(self) -> list[str]:
        """The keys, set away from their defaults, that only the worker `chorus up` starts reads (how it loads
        the model); a running worker was started with its own flags, so for it they would do nothing."""
        return [k for k in LOADING_KEYS if getattr(self, k) != ModelSpec.model_fields[k].default]

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "name" not in data:
            path = data.get("path")
            if not isinstance(path, str):
                if path is None and "address" in data:
                    return data  # no path to name it after: name is required (reported as missing)
                return {**data, "name": "?"}  # path is reported; don't also report name
            name = re.split(r"[/\\]", path.rstrip("/\\"))[-1]
            return {**data, "name": name or path}
        return data

    @field_validator("path")
    @classmethod
    def _resolve_path(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        base_dir = info.context.get("base_dir") if isinstance(info.context, dict) else None
        return _resolve_model_path(value, base_dir) if base_dir is not None else value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _DEVICE_RE.match(value):
            raise ValueError(f"must be cpu, cuda, cuda:N or auto (got {value!r})")
        return value

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str | None) -> str | None:
        if value is None:
            return None
        match = _ADDRESS_RE.match(value)
        if not match or not 1 <= int(match["port"]) <= 65535:
            raise ValueError(f"must be host:port with port 1-65535 (got {value!r})")
        return value

    @field_validator("max_memory", mode="before")
    @classmethod
    def _check_max_memory(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, Mapping):  # pydantic reports only ValueError, not TypeError
            msg = f"must be a mapping like {{0: 24GiB, cpu: 64GiB}} (got {_short(value)})"
            raise ValueError(msg)
        out: dict[int | str, int | str] = {}
        for key, size in value.items():
            if isinstance(key, str) and key.isdigit():
                key = int(key)
            valid_key = (isinstance(key, int) and not isinstance(key, bool) and key >= 0) or (key in _MEMORY_DEVICES)
            if not valid_key:
                raise ValueError(f"key {_short(key)}: must be a GPU index or one of {', '.join(_MEMORY_DEVICES)}")
            valid_size = (isinstance(size, int) and not isinstance(size, bool) and size > 0) or (
                isinstance(size, str) and _SIZE_RE.match(size.strip())
            )
            if not valid_size:
                raise ValueError(f"entry {key!r}: size must be like '24GiB' or a byte count (got {_short(size)})")
            out[key] = size.strip() if isinstance(size, str) else size
        return out


class _Ensemble(_Section):
    """EnsembleConfig without the strategies' sections (added from the registry below)."""

    strategy: str = "gac"  # a name in STRATEGIES; defaults to "threshold" when a primary exists
    weights: Literal["average", "score"] = "average"  # GaC's NORM_TYPE
    threshold: float = Field(0.5, ge=0.0, le=1.0)  # a probability; 1 means always ensemble
    transport: Transport = Transport()
    defaults: RequestDefaults = RequestDefaults()
    limits: Limits = Limits()
    server: Server = Server()
    discovery: Discovery = Discovery()
    http: Http = Http()
    worker_tls: WorkerTls | None = None
    models: tuple[ModelSpec, ...] = Field(strict=False)

    @model_validator(mode="before")
    @classmethod
    def _infer_strategy(cls, data: Any) -> Any:
        """GaC semantics: a primary model and no explicit strategy means 'threshold'."""
        if isinstance(data, Mapping) and "strategy" not in data:
            models = data.get("models")
            if isinstance(models, list | tuple) and any(_priority(m) == "primary" for m in models):
                return {**data, "strategy": "threshold"}
        return data

    @field_validator("transport", "defaults", "limits", "server", "discovery", "http", mode="before")
    @classmethod
    def _empty_section(cls, value: Any) -> Any:
        return _empty_section(value)

    @field_validator("strategy")
    @classmethod
    def _check_strategy(cls, value: str) -> str:
        if value not in STRATEGIES:
            raise ValueError(f"unknown strategy {value!r}; valid: {', '.join(STRATEGIES)}")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> Self:
        problems: list[tuple[Loc, str]] = []
        if not self.models:
            problems.append((("models",), "at least one model is required"))
        seen_names: dict[str, int] = {}
        seen_addresses: dict[str, int] = {}
        primaries: list[int] = []
        for i, model in enumerate(self.models):
            if model.name in seen_names:
                msg = f"duplicate name {model.name!r} (model {seen_names[model.name]} has it)"
                problems.append((("models", i, "name"), msg))
            seen_names.setdefault(model.name, i)
            if model.path is None and model.address is None and self.discovery.mode == "static":
                msg = "missing: required for a model without an address (the worker `chorus up` starts loads it)"
                problems.append((("models", i, "path"), msg))
            if model.address is not None or self.discovery.mode == "kubernetes":
                running = "a worker at an address" if model.address is not None else "a discovered worker pod"
                for key in model.loading_settings():
                    flag = "--" + key.replace("_", "-")
                    msg = f"sets how `chorus up` loads the model; {running} was loaded by its own {flag}"
                    problems.append((("models", i, key), msg))
            if model.address is not None:
                if model.address in seen_addresses:
                    msg = f"same address as model {seen_addresses[model.address]}"
                    problems.append((("models", i, "address"), msg))
                seen_addresses.setdefault(model.address, i)
            if model.priority == "primary":
                if primaries:
                    msg = f"more than one primary model (model {primaries[0]} is primary)"
                    problems.append((("models", i, "priority"), msg))
                primaries.append(i)
            if self.weights == "score" and model.score is None:
                problems.append((("models", i, "score"), "required when weights is 'score'"))
        for strategy in STRATEGIES.values():  # every strategy's section: a request may ask for any strategy
            problems += strategy.check_settings(self)
        problems += STRATEGIES[self.strategy].check_configured(self)
        if self.defaults.max_new_tokens > self.limits.max_new_tokens:
            msg = f"{self.defaults.max_new_tokens} exceeds limits.max_new_tokens ({self.limits.max_new_tokens})"
            problems.append((("defaults", "max_new_tokens"), msg))
        if problems:
            raise _CrossFieldError(problems)
        return self

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.models)

    @property
    def primary_index(self) -> int | None:
        return next((i for i, m in enumerate(self.models) if m.priority == "primary"), None)

    def alone(self, name: str) -> Self:
        """This config with one model alone (a request for that member): strategy gac by default, the
        whole weight, no setting naming another member (e.g. no other drafter)."""
        spec = self.models[self.model_names.index(name)]
        sections = {section: getattr(self, section).alone() for section in SECTIONS}
        update = {"models": (spec,), "strategy": "gac", "weights": "average", **sections}
        return self.model_copy(update=update)

    def weight_vector(self) -> list[float]:
        """Normalised ensemble weights, one per model: equal, or score / sum of scores."""
        if self.weights == "average":
            return [1.0 / len(self.models)] * len(self.models)
        scores = [float(m.score or 0.0) for m in self.models]
        total = sum(scores)
        return [s / total for s in scores]


def _empty_section(value: Any) -> Any:
    return {} if value is None else value  # `defaults:` with every line commented out


# The whole product configuration (immutable): the fields above, and a section per strategy with
# settings, named after it (`safe:`), from the registry: a new strategy needs no change here.
_STRATEGY_SECTIONS: dict[str, Any] = {
    name: (Annotated[settings, BeforeValidator(_empty_section)], settings()) for name, settings in SECTIONS.items()
}
EnsembleConfig = create_model(
    "EnsembleConfig",
    __base__=_Ensemble,
    __module__=__name__,
    __doc__="The whole product configuration (immutable).",
    **_STRATEGY_SECTIONS,
)


# --------------------------------------------------------------------------- loading


def load_config(source: str | os.PathLike[str] | Mapping[str, Any]) -> EnsembleConfig:
    """Load a YAML file (native or GaC format), or validate an already-parsed mapping.

    Relative model paths resolve against the file's directory, or the current
    directory for a mapping. Raises ConfigError listing every problem.
    """
    if not isinstance(source, str | os.PathLike):
        return parse_config(source, Path.cwd())
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(["file not found"], str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"cannot read: {_os_reason(exc)}"], str(path)) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_problem(exc)], str(path)) from None
    except RecursionError:
        raise ConfigError(["invalid YAML: nested too deeply"], str(path)) from None
    if data is None:
        raise ConfigError(["file is empty (expected a mapping with at least 'models')"], str(path))
    try:
        return parse_config(data, path.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(exc.problems, str(path)) from None


def parse_config(data: Mapping[str, Any], base_dir: Path) -> EnsembleConfig:
    """Validate parsed data (native or GaC format); relative paths resolve against base_dir."""
    if not isinstance(data, Mapping):
        raise ConfigError([f"(top level): expected a mapping (got {_short(data)})"])
    is_gac = any(key in data for key in GAC_KEYS)
    native, problems = _from_gac(data) if is_gac else (dict(data), [])
    if native is not None:
        try:
            config = EnsembleConfig.model_validate(native, context={"base_dir": Path(base_dir)})
        except ValidationError as exc:
            rename = _gac_loc if is_gac else _same_loc
            problems.extend(_problems_from(exc, rename, gac=is_gac))
    if problems or native is None:
        raise ConfigError(problems)
    return config


def _from_gac(data: Mapping[Any, Any]) -> tuple[dict[str, Any] | None, list[str]]:
    """Translate GaC's format to native data; None when it cannot be validated at all."""
    problems: list[str] = []
    native_keys = set(EnsembleConfig.model_fields)
    for key in data:
        if key in native_keys:
            problems.append(
                f"{key}: native key in a GaC-format file (GaC keys: {', '.join(GAC_KEYS)}); use one format or the other"
            )
        elif key not in GAC_KEYS:
            problems.append(f"{_format_loc((), key)}: {_unknown_key(key, GAC_KEYS)}")
    if "CONFIG_API_SERVER" not in data:
        problems.append("CONFIG_API_SERVER: missing required key (the list of models)")
    if any(key in native_keys for key in data) or "CONFIG_API_SERVER" not in data:
        return None, problems
    native: dict[str, Any] = {}
    if "NORM_TYPE_API_SERVER" in data:
        native["weights"] = data["NORM_TYPE_API_SERVER"]
    if "THRESHOLD_API_SERVER" in data:
        native["threshold"] = data["THRESHOLD_API_SERVER"]
    models = data["CONFIG_API_SERVER"]
    if isinstance(models, list):
        models = [_from_gac_model(i, entry, problems) for i, entry in enumerate(models)]
    native["models"] = models
    return native, problems


def _from_gac_model(index: int, entry: Any, problems: list[str]) -> Any:
    if not isinstance(entry, Mapping):
        return entry  # validation reports it
    model: dict[Any, Any] = {}
    for key, value in entry.items():
        if key in _GAC_MODEL_KEYS:
            model["path" if key == "weight" else key] = value
        else:
            loc = _format_loc(("CONFIG_API_SERVER", index), key)
            problems.append(f"{loc}: {_unknown_key(key, _GAC_MODEL_KEYS)}")
    return model


def _same_loc(loc: Loc) -> Loc:
    return loc


def _gac_loc(loc: Loc) -> Loc:
    if not loc or loc[0] not in _GAC_TOP:
        return loc
    rest = loc[1:]
    if loc[0] == "models" and len(rest) >= 2 and rest[1] == "path":
        rest = (rest[0], "weight", *rest[2:])
    return (_GAC_TOP[str(loc[0])], *rest)


# --------------------------------------------------------------------------- CPU fallback


def cpu_computes_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has bfloat16 instructions (x86 AVX512-BF16 or AMX), read from /proc/cpuinfo (Linux;
    elsewhere: no). Where it has, torch runs a bfloat16 model about as fast as float32 one sequence at a
    time and faster in batches (README, "Configuration"); elsewhere bfloat16 is emulated, several times slower."""
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def cpu_adjusted(
    config: EnsembleConfig, cuda_available: bool, cpu_bf16: bool | None = None
) -> tuple[EnsembleConfig, list[str]]:
    """Make every model runnable without CUDA; returns the config and one note per change.

    With CUDA available the config is returned unchanged, with a note for each num_gpus (GaC's key: a worker
    runs where its device, or its max_memory, places it). Otherwise, per model:
    device cuda/cuda:N/auto -> cpu; dtype float16 -> float32, and bfloat16 -> float32 unless the CPU
    computes bfloat16 itself (`cpu_bf16`; None: `cpu_computes_bf16()`); auto stays auto, which the worker
    resolves to float32 on CPU; max_memory and num_gpus are dropped. Every change except auto -> cpu gets
    a note. Quantization 8bit/4bit cannot run without CUDA and is not silently dropped: a ConfigError says
    so (quantization: none runs the model unquantized).
    """
    if cuda_available:
        placed = "a worker runs where its device (or its max_memory) places it"
        unread = [(i, m) for i, m in enumerate(config.models) if m.num_gpus is not None]
        return config, [f"models[{i}] ({m.name}): num_gpus {m.num_gpus:g} ignored: {placed}" for i, m in unread]
    if cpu_bf16 is None:
        cpu_bf16 = cpu_computes_bf16()
    refused = [
        f"models[{i}].quantization: {m.quantization} needs a CUDA device (bitsandbytes); supported without one: "
        "none (the model unquantized), or a quantized GGUF file as its path"
        for i, m in enumerate(config.models)
        if m.quantization != "none"
    ]
    if refused:
        raise ConfigError(refused)
    notes: list[str] = []
    models: list[ModelSpec] = []
    for i, model in enumerate(config.models):
        label = f"models[{i}] ({model.name})"
        update: dict[str, Any] = {}
        if model.device != "cpu":
            update["device"] = "cpu"
            if model.device != "auto":
                notes.append(f"{label}: device {model.device} ignored, using cpu: no CUDA device")
        if model.dtype == "float16" or (model.dtype == "bfloat16" and not cpu_bf16):
            update["dtype"] = "float32"
            why = "no CUDA device" + ("" if model.dtype == "float16" else ", and this CPU has no bfloat16 instructions")
            notes.append(f"{label}: dtype {model.dtype} ignored, using float32: {why}")
        for key in ("max_memory", "num_gpus"):
            if getattr(model, key) is not None:
                update[key] = None
                notes.append(f"{label}: {key} ignored: no CUDA device")
        models.append(model.model_copy(update=update) if update else model)
    return config.model_copy(update={"models": tuple(models)}), notes


# --------------------------------------------------------------------------- helpers


def _resolve_model_path(path: str, base_dir: Path) -> str:
    """Absolute path for a local model directory; a hub id ("org/name") is kept verbatim.

    A path is local when it is absolute, starts with '.', '..' or '~', exists relative
    to base_dir, or has more than one '/' (hub ids have at most one).
    """
    expanded = Path(path).expanduser()
    if expanded.is_absolute():
        return os.path.normpath(expanded)
    candidate = base_dir / expanded
    explicit = path.startswith(("./", "../", ".\\", "..\\")) or path in (".", "..")
    if explicit or path.count("/") > 1 or candidate.exists():
        return os.path.normpath(candidate.absolute())
    return path


def _priority(model: Any) -> Any:
    if isinstance(model, Mapping):
        return model.get("priority")
    return getattr(model, "priority", None)


def _problems_from(exc: ValidationError, rename: typing.Callable[[Loc], Loc], gac: bool) -> list[str]:
    problems: list[str] = []
    for err in exc.errors(include_url=False):
        loc: Loc = tuple(err["loc"])
        error = err.get("ctx", {}).get("error")
        if isinstance(error, _CrossFieldError):
            problems.extend(f"{_format_loc(rename(p_loc))}: {msg}" for p_loc, msg in error.problems)
            continue
        kind = err["type"]
        if kind == "invalid_key":
            where = _format_loc(rename(loc[:-1]))
            problems.append(f"{where}: key {_short(err['input'])} is not a string")
        elif kind == "extra_forbidden":
            gac_model = gac and loc[0] == "models"
            allowed = _GAC_MODEL_KEYS if gac_model else _fields_at(loc[:-1])
            where = _format_loc(rename(loc[:-1]), loc[-1])
            problems.append(f"{where}: {_unknown_key(loc[-1], allowed)}")
        else:
            problems.append(f"{_format_loc(rename(loc))}: {_message(kind, err)}")
    return problems


_TYPE_MESSAGES = {
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "dict_type": "expected a mapping",
    "tuple_type": "expected a list",
    "list_type": "expected a list",
    "string_type": "expected a string",
    "int_type": "expected an integer",
    "float_type": "expected a number",
    "bool_type": "expected true or false",
    "finite_number": "expected a finite number",
}


def _message(kind: str, err: Any) -> str:
    if kind == "missing":
        return "missing required key"
    if kind == "value_error":
        return str(err["ctx"]["error"])
    msg = _TYPE_MESSAGES.get(kind) or err["msg"].replace("Input should be", "must be")
    return f"{msg} (got {_short(err['input'])})"


def _fields_at(loc: Loc) -> tuple[str, ...]:
    """Field names of the model that sits at loc inside EnsembleConfig."""
    node: Any = EnsembleConfig
    for part in loc:
        if isinstance(part, int):
            continue  # list index: the element type was unwrapped already
        field = node.model_fields.get(part) if isinstance(node, type) else None
        if field is None:
            return ()
        node = field.annotation
        for arg in typing.get_args(node) or (node,):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                node = arg
    return tuple(node.model_fields) if isinstance(node, type) and issubclass(node, BaseModel) else ()


def _unknown_key(key: Any, allowed: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(key), allowed, n=1)
    if close:
        return f"unknown key (did you mean {close[0]!r}?)"
    return f"unknown key (valid keys: {', '.join(allowed)})" if allowed else "unknown key"


def _format_loc(loc: Loc, key: Any = None) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    if key is not None:
        out += f".{key}" if out else str(key)
    return out or "(top level)"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _os_reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return f"invalid YAML: {problem}"
    return f"line {mark.line + 1}, column {mark.column + 1}: invalid YAML: {problem}"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reports bad values with their line."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, AttributeError, LookupError, ArithmeticError) as exc:
            # e.g. `2020-02-30` or `!!int x`: PyYAML lets the Python error escape
            raise yaml.constructor.ConstructorError(None, None, f"invalid value: {exc}", node.start_mark) from None


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:
            continue  # unhashable key: construct_mapping reports it
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"duplicate key {key!r}",
                key_node.start_mark,
            )
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
