#!/usr/bin/env bash
# Writes .device/ for scripts/device_check.py on a machine that cannot install or fetch anything: the default
# models' configs and tokenizers (no weights: device_check builds them with random weights) and wheels of the
# project's dependencies that a bare CUDA image lacks. On that machine, from the repository root:
#   pip install --no-deps .device/wheels/*.whl && PYTHONPATH=. python3 scripts/device_check.py --random-weights .device
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=.device
rm -rf "$OUT" && mkdir -p "$OUT/lm" "$OUT/embedder" "$OUT/wheels"
# the causal LM: the converted default's small files
LM=$("$PY" -c "from memory_llm.config import Settings; from memory_llm.models import resolve_model, converted_dir
import sys; s = Settings.load(); d, g = resolve_model(s.model); print(converted_dir(s.cache_dir, d, g) if g else d)")
test -f "$LM/config.json" || { echo "device_bundle: no converted model at $LM (run make demo first)" >&2; exit 1; }
find "$LM" -maxdepth 1 -type f ! -name '*.safetensors' ! -name '*.bin' ! -name '*.gguf' -exec cp {} "$OUT/lm/" \;
# the embedder: the sentence-transformers directory without its weights
EMB=$("$PY" -c "from memory_llm.models import resolve_embedder; print(resolve_embedder('all-MiniLM-L6-v2'))")
cp -r "$EMB/." "$OUT/embedder/" && find "$OUT/embedder" \( -name '*.safetensors' -o -name '*.bin' -o -name README.md \) -delete
# wheels a bare CUDA image lacks (the versions of the lock)
for pkg in faiss-cpu gguf pypdf tomli-w; do
  spec=$(grep -i -m1 "^$pkg==" requirements.lock || echo "$pkg")
  "$PY" -m pip download -q --no-deps -d "$OUT/wheels" "$spec"
done
du -sh "$OUT"
