#!/usr/bin/env bash
# checkov (framework kubernetes) on the rendered Helm chart, with the default values and with
# deploy/helm/chorus/ci/tls-values.yaml. checkov pins many heavy dependencies, so it lives in its
# own virtualenv under .tools/checkov (git-ignored; installed once, idempotent), never in the
# project's. Skipped checks, each with its reason: deploy/helm/chorus/.checkov.yaml.
# Exits non-zero when any check fails. Usage: scripts/checkov.sh [extra checkov args...]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
version=3.3.30
venv="$root/.tools/checkov"
stamp="$venv/.installed-$version"
if [ ! -f "$stamp" ]; then
  echo "installing checkov $version into $venv (once)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "checkov==$version" >"$venv.log" 2>&1; then
    cat "$venv.log" >&2
    exit 1
  fi
  touch "$stamp"
fi
bash "$root/scripts/fetch_helm.sh" >/dev/null
chart="$root/deploy/helm/chorus"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$root/.tools/bin/helm" template chorus "$chart" --namespace chorus >"$out/default.yaml"
"$root/.tools/bin/helm" template chorus "$chart" --namespace chorus \
  -f "$chart/ci/tls-values.yaml" >"$out/tls.yaml"
"$venv/bin/checkov" --config-file "$chart/.checkov.yaml" --directory "$out" \
  --framework kubernetes --compact --quiet "$@"
