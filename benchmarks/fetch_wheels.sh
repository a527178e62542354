#!/usr/bin/env bash
# Download, here (where the network is), the wheels the GPU machine's image lacks for benchmarks/gpu_check.sh:
# trl, datasets, rapidfuzz, and the dependencies of datasets that the image does not have (dill, multiprocess).
# The image (Python 3.12, torch 2.11, transformers 5.17) already has accelerate, peft, pandas, pyarrow, fsspec,
# huggingface-hub, xxhash, aiohttp, requests, httpx, pyyaml, tqdm, filelock, psutil, jinja2, typer, rich.
#
# Versions are pinned to the ones in this checkout's virtual environment (so the GPU run uses the TRL the CPU run
# used); set TRL_VERSION=... etc. to override. Every wheel is fetched with --no-deps, so nothing the image already
# has is replaced: gpu_check.sh installs them with --no-deps into a separate target directory.
#
#   bash benchmarks/fetch_wheels.sh            # -> benchmarks/wheels/*.whl (ignored by git)
set -euo pipefail

cd "$(dirname "$0")/.."
DEST=benchmarks/wheels
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}

version() {  # the version installed here, empty when not installed
    "$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1"
}

spec() {  # name==version when a version is known
    local name=$1 override=$2 v
    v=${override:-$(version "$name")}
    if [ -n "$v" ]; then echo "$name==$v"; else echo "$name"; fi
}

PACKAGES=(
    "$(spec trl "${TRL_VERSION:-}")"
    "$(spec datasets "${DATASETS_VERSION:-}")"
    "$(spec rapidfuzz "${RAPIDFUZZ_VERSION:-}")"
    "$(spec dill "${DILL_VERSION:-}")"
    "$(spec multiprocess "${MULTIPROCESS_VERSION:-}")"
)

mkdir -p "$DEST"
echo "fetching into $DEST: ${PACKAGES[*]}"
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_28_x86_64 -d "$DEST" "${PACKAGES[@]}"

# One version of each package only: two would stop the install on the GPU machine.
for name in trl datasets rapidfuzz dill multiprocess; do
    count=$(ls "$DEST" | grep -ci "^${name}-[0-9]" || true)
    if [ "$count" != 1 ]; then
        echo "expected one $name wheel in $DEST, found $count" >&2
        exit 1
    fi
done

echo "requirements the wheels declare (the GPU image must satisfy the ones not fetched here):"
for wheel in "$DEST"/*.whl; do
    echo "  $(basename "$wheel"):"
    unzip -p "$wheel" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^/    /' || true
done
du -sh "$DEST"
