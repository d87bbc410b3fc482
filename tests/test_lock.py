"""The lock files in requirements/ against pyproject.toml, and every install that uses them.

pyproject.toml keeps ranges (people install the SDK into their own environments); `make`, CI and
both images install exact versions with hashes from requirements/*.txt, written by `make lock`
(scripts/lock.sh). These tests fail when the two drift apart: a dependency added to
pyproject.toml and not locked, a range the lock no longer satisfies, an install that bypasses
the lock. The fix for a drift is `make lock`.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "lock.txt"  # every extra, CPU torch: make and CI
COORDINATOR_LOCK = ROOT / "requirements" / "coordinator.txt"  # base + coordinator: Dockerfile.coordinator
WORKER_GPU_LOCK = ROOT / "requirements" / "worker-gpu.txt"  # base + worker, no torch: Dockerfile.worker
LOCKS = (LOCK, COORDINATOR_LOCK, WORKER_GPU_LOCK)
CUDA_PACKAGES = re.compile(r"^(nvidia-|cuda-|triton$)")


@dataclass(frozen=True)
class Pin:
    name: str  # canonical
    version: str
    hashes: tuple[str, ...]


def parse_lock(path: Path) -> dict[str, Pin]:
    """requirements.txt as uv writes it: `name==version \\` then `--hash=sha256:...` lines."""
    logical: list[str] = []
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current.strip(), f"{path.name}: dangling line continuation"
    pins: dict[str, Pin] = {}
    for entry in logical:
        assert not entry.startswith("-"), f"{path.name}: option line {entry!r}: the lock holds pins only"
        spec, *options = entry.split(" --")
        requirement = Requirement(spec.strip())
        specifiers = list(requirement.specifier)
        assert len(specifiers) == 1 and specifiers[0].operator == "==", f"{path.name}: {spec!r} is not pinned with =="
        hashes = tuple(o.removeprefix("hash=").strip() for o in options if o.startswith("hash="))
        assert len(hashes) == len(options), f"{path.name}: {entry!r} has options other than --hash"
        name = canonicalize_name(requirement.name)
        assert name not in pins, f"{path.name}: {name} pinned twice"
        pins[name] = Pin(name, specifiers[0].version, hashes)
    return pins


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirements(group: str) -> list[Requirement]:
    """group: "base", "build" ([build-system] requires) or an extra's name."""
    data = project()
    if group == "base":
        return [Requirement(r) for r in data["project"]["dependencies"]]
    if group == "build":
        return [Requirement(r) for r in data["build-system"]["requires"]]
    return [Requirement(r) for r in data["project"]["optional-dependencies"][group]]


def extras() -> list[str]:
    return sorted(project()["project"]["optional-dependencies"])


def assert_locked(lock: Path, groups: list[str], leave_out: set[str] = frozenset()) -> None:
    pins = parse_lock(lock)
    for group in groups:
        for requirement in requirements(group):
            name = canonicalize_name(requirement.name)
            if name in leave_out:
                continue
            assert name in pins, f"{requirement} ({group}) is not in {lock.name}: run `make lock`"
            pin = pins[name]
            assert pin.hashes, f"{name} has no --hash= in {lock.name}"
            assert requirement.specifier.contains(Version(pin.version), prereleases=True), (
                f"{lock.name} pins {name}=={pin.version}, outside pyproject.toml's {requirement}: run `make lock`"
            )


def test_every_dependency_of_every_extra_is_pinned_with_hashes_in_the_lock() -> None:
    assert {"coordinator", "worker", "dev"} <= set(extras())
    assert_locked(LOCK, ["base", "build", *extras()])


@pytest.mark.parametrize("lock", LOCKS, ids=lambda p: p.name)
def test_every_line_of_every_lock_is_an_exact_pin_with_hashes(lock: Path) -> None:
    """What `pip install --require-hashes` demands: `==` and at least one hash, for each package."""
    pins = parse_lock(lock)
    assert pins
    for pin in pins.values():
        assert pin.hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in pin.hashes), pin
    assert not [n for n in pins if CUDA_PACKAGES.match(n)], f"CUDA packages in {lock.name}"
    assert "make lock" in lock.read_text().splitlines()[1], "written by `make lock`, not by hand"


def test_the_lock_holds_the_cpu_build_of_the_pinned_torch() -> None:
    (torch,) = [r for r in requirements("worker") if canonicalize_name(r.name) == "torch"]
    assert str(torch.specifier) == "==2.13.0"
    pin = parse_lock(LOCK)["torch"]
    assert pin.version == "2.13.0+cpu" and torch.specifier.contains(Version(pin.version))
    # Where this machine keeps the wheel that pip installs, its hash is the locked one.
    wheels = sorted(Path("/opt/wheels").glob("torch-2.13.0+cpu-*.whl"))
    if not wheels:
        pytest.skip("no local CPU wheel of torch to hash here")
    digest = hashlib.sha256()
    with wheels[0].open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    assert f"sha256:{digest.hexdigest()}" in pin.hashes


def test_the_image_locks_hold_their_extras_at_the_versions_of_the_cpu_lock() -> None:
    assert_locked(COORDINATOR_LOCK, ["base", "build", "coordinator"])
    assert_locked(WORKER_GPU_LOCK, ["base", "build", "worker"], leave_out={"torch"})
    full = parse_lock(LOCK)
    coordinator, worker = parse_lock(COORDINATOR_LOCK), parse_lock(WORKER_GPU_LOCK)
    assert "torch" not in coordinator and "transformers" not in coordinator
    assert "torch" not in worker  # the CUDA torch of the base image stays
    for pins in (coordinator, worker):
        for name, pin in pins.items():
            assert name in full and full[name].version == pin.version, (name, pin.version)


def _make_rules() -> dict[str, tuple[str, list[str]]]:
    """Makefile target -> (prerequisites, recipe lines), with $(VAR) of `VAR := value` expanded."""
    text = (ROOT / "Makefile").read_text()
    variables = dict(re.findall(r"^(\w+) *[:?]?= *(.*?) *$", text, re.M))

    def expand(s: str) -> str:
        for _ in range(5):
            s = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), s)
        return s

    rules: dict[str, tuple[str, list[str]]] = {}
    target = None
    for line in text.splitlines():
        if line.startswith("\t") and target is not None:
            rules[target][1].append(expand(line.strip()))
            continue
        match = re.match(r"^([^\s:=#][^:=]*):(?!=)(.*)$", line)
        target = None
        if match:
            target = expand(match.group(1).strip())
            rules[target] = (expand(match.group(2).strip()), [])
    return rules


def test_make_installs_the_lock_with_require_hashes_and_reinstalls_when_it_changes() -> None:
    rules = _make_rules()
    (stamp,) = [t for t in rules if t.endswith("/.installed")]
    prerequisites, recipe = rules[stamp]
    assert "requirements/lock.txt" in prerequisites.split() and "pyproject.toml" in prerequisites.split()
    installs = [line for line in recipe if "pip install" in line]
    assert any("--require-hashes" in line and "-r requirements/lock.txt" in line for line in installs), installs
    for line in installs:  # anything else installs the project alone, or a pinned, hashed file
        assert "--require-hashes" in line or "--no-deps" in line, line
    assert "bash scripts/lock.sh" in rules["lock"][1]
    assert "lock" in rules[".PHONY"][0].split()


@pytest.mark.parametrize(
    ("dockerfile", "lock"),
    [("Dockerfile.coordinator", COORDINATOR_LOCK), ("Dockerfile.worker", WORKER_GPU_LOCK)],
)
def test_dockerfiles_install_their_lock_with_require_hashes(dockerfile: str, lock: Path) -> None:
    text = (ROOT / dockerfile).read_text()
    relative = lock.relative_to(ROOT).as_posix()
    assert re.search(rf"^COPY {re.escape(relative)} ", text, re.M), f"{dockerfile} does not copy {relative}"
    runs = re.findall(r"^RUN ((?:.*\\\n)*.*)$", text, re.M)
    installs = [c.strip() for run in runs for c in re.split(r"&&|\\\n", run) if "pip install" in c]
    assert f"pip install --require-hashes -r {relative}" in installs, installs
    for command in installs:
        assert "--require-hashes" in command or "--no-deps" in command, command
