#!/usr/bin/env bash
# The host `make e2e` needs: a docker daemon (reused if one answers), debootstrap for the stand-in bases.
# Missing ones come from Debian (docker.io, debootstrap; needs root and apt). dockerd starts without a
# bridge or iptables rules: the e2e's containers use the host's network (--network host), on loopback.
set -euo pipefail
docker="${DOCKER:-docker}"
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]} from Debian"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if "$docker" info >/dev/null 2>&1; then
  echo "dockerd: running"
  exit 0
fi
log="${DOCKERD_LOG:-/var/log/chorus-e2e-dockerd.log}"
echo "dockerd: starting (log $log)"
setsid nohup dockerd --bridge=none --iptables=false --ip6tables=false >"$log" 2>&1 </dev/null &
for _ in $(seq 60); do
  "$docker" info >/dev/null 2>&1 && exit 0
  sleep 1
done
echo "dockerd did not answer within 60 s:" >&2
tail -20 "$log" >&2
exit 1
