"""How much more memory this process may take on its host: what the kernel reports available, and, in a
container, what its cgroup's limit leaves (a pod's `resources.limits.memory`). Read to size the KV pool
on CPU, whose pages become resident as blocks are used: a pool larger than this ends in an OOM kill."""

from __future__ import annotations

from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
MEMINFO = Path("/proc/meminfo")


def memory_left(cgroup: Path = CGROUP, meminfo: Path = MEMINFO) -> int | None:
    """Bytes this process may still take: the least of MemAvailable and the cgroup's limit minus its usage
    (cgroup v2, else v1); None if neither is readable."""
    known = [b for b in (_available(meminfo), _cgroup_left(cgroup)) if b is not None]
    return min(known) if known else None


def _available(meminfo: Path) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_left(root: Path) -> int | None:
    v1 = ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")
    for limit_file, usage_file in (("memory.max", "memory.current"), v1):
        try:
            limit = (root / limit_file).read_text().strip()
            usage = int((root / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:  # no limit (v1 writes a huge number)
            return None
        return max(0, int(limit) - usage)
    return None
