#!/usr/bin/env bash
# Local STAND-IN base images, for building and testing the images where no image registry is reachable
# (CI here, `make e2e`). A test device, never the product's base: the released images build FROM the
# Dockerfiles' defaults (python:3.11-slim, and pytorch/pytorch's CUDA image for the worker).
#
#   chorus-stand-in/python:3.11-bookworm   debootstrap of Debian bookworm: python3, pip, the CA bundle
#   chorus-stand-in/torch:2.13.0-cpu       that, plus the CPU wheel of torch 2.13.0 (the worker's pin)
#
# Both are made once and reused (an existing tag is kept; FORCE=1 makes them again). Needs root,
# debootstrap and a running dockerd. The host's CA bundle goes into the images, so a build with
# `--network host` reaches PyPI as the host does. Env: DEBIAN_MIRROR, TORCH_WHEEL (a local .whl).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
docker="${DOCKER:-docker}"
python_tag="${PYTHON_BASE_TAG:-chorus-stand-in/python:3.11-bookworm}"
torch_tag="${TORCH_BASE_TAG:-chorus-stand-in/torch:2.13.0-cpu}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
ca_bundle="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"

have() { [ "${FORCE:-0}" != 1 ] && "$docker" image inspect "$1" >/dev/null 2>&1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

if have "$python_tag"; then
  echo "$python_tag: present"
else
  echo "$python_tag: debootstrap of bookworm from $mirror"
  rootfs="$tmp/rootfs"
  # minbase + what the Dockerfiles use: python3 and pip (as `python` and `pip`), useradd (passwd), CAs.
  debootstrap --variant=minbase --include=python3,python3-pip,python-is-python3,ca-certificates,passwd \
    bookworm "$rootfs" "$mirror" >"$tmp/debootstrap.log" 2>&1 || { tail -20 "$tmp/debootstrap.log"; exit 1; }
  cp "$ca_bundle" "$rootfs/etc/ssl/certs/ca-certificates.crt"
  # `pip` is the Debian one; a container image is its own environment, as in python:3.11-slim.
  ln -sf pip3 "$rootfs/usr/bin/pip"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* \
    "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*
  tar -C "$rootfs" -c . | "$docker" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PIP_BREAK_SYSTEM_PACKAGES=1' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$python_tag" >/dev/null
  echo "$python_tag: made"
fi

if have "$torch_tag"; then
  echo "$torch_tag: present"
else
  wheel="${TORCH_WHEEL:-}"
  if [ -z "$wheel" ]; then
    # The CPU wheel wherever pip finds it (a local find-links folder, a mirror, or PyPI).
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
      --platform manylinux_2_28_x86_64 --dest "$tmp/wheels" torch==2.13.0
    wheel="$(ls "$tmp"/wheels/torch-2.13.0*.whl)"
  fi
  ctx="$tmp/torch"
  mkdir -p "$ctx"
  cp "$wheel" "$ctx/"
  cat >"$ctx/Dockerfile" <<EOF
FROM $python_tag
COPY $(basename "$wheel") /tmp/
# torch with its own dependencies, as the PyTorch image has them; the worker's lock pins the rest.
RUN pip install --no-cache-dir /tmp/$(basename "$wheel") && rm /tmp/*.whl
EOF
  "$docker" build --quiet --network host -t "$torch_tag" "$ctx" >/dev/null
  echo "$torch_tag: made"
fi
"$docker" image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep '^chorus-stand-in/' || true
