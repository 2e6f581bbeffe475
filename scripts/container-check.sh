#!/usr/bin/env bash
# Build the API image and check it answers, with podman, on a machine that has no Docker engine and
# no image registry (only Debian's and Python's package registries):
#   1. the base image is Debian bookworm made with `debootstrap --variant=minbase` + `podman import`;
#   2. the build context is this checkout's files, plus the CPU PyTorch wheel and (while no bundled
#      model exists) a randomly initialised model, in a temporary folder: the work tree stays clean;
#   3. build with runc, host networking and raised ulimits; run; check /health, /ready, a
#      completion, the image's HEALTHCHECK and the non-root user, on 127.0.0.1.
# Run as root: scripts/container-check.sh   (QUILL_CHECK_KEEP=1 keeps the container running)
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${QUILL_CHECK_DIR:-/tmp/quill-container-check}
BASE=localhost/debian-bookworm-minbase:latest
IMAGE=localhost/quillgpt:check
NAME=quill-check
PORT=${QUILL_CHECK_PORT:-18080}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
TORCH_WHEEL=${TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}
PYTHON=${PYTHON:-.venv/bin/python}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
# Containers get 1024 open files by default, too few for a server with many clients; asking for
# more than a sandboxed root may grant fails at start ("error setting rlimit type 7" for nofile,
# "type 6" for nproc, which here fails even at the shell's own hard limit). So: open files up to
# this shell's hard limit, processes up to 32768 (what podman gives by default).
hard() { local v; v=$(ulimit -H "$1"); [ "$v" = unlimited ] && v=$2; [ "$v" -gt "$2" ] && v=$2; echo "$v"; }
NOFILE=$(hard -n 1048576)
NPROC=$(hard -u 32768)
ULIMITS=(--ulimit "nofile=$NOFILE:$NOFILE" --ulimit "nproc=$NPROC:$NPROC")
PODMAN=(podman --runtime runc)

step() { printf '\n== %s\n' "$*"; }
cleanup() { [ "${QUILL_CHECK_KEEP:-0}" = 1 ] || "${PODMAN[@]}" rm -f "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT

step "tools"
if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq podman runc debootstrap
fi
podman --version
runc --version | head -1

step "base image $BASE (debootstrap --variant=minbase bookworm)"
if "${PODMAN[@]}" image exists "$BASE"; then
    echo "already there"
else
    rm -rf "$WORK/rootfs"
    mkdir -p "$WORK"
    debootstrap --variant=minbase bookworm "$WORK/rootfs" "$MIRROR"
    tar -C "$WORK/rootfs" -c . | "${PODMAN[@]}" import - "$BASE"
fi

step "build context $WORK/context"
CTX="$WORK/context"
rm -rf "$CTX"
mkdir -p "$CTX/wheels"
git ls-files -z --cached --others --exclude-standard | tar --null -T - --ignore-failed-read -c 2>/dev/null | tar -x -C "$CTX"
cp "$TORCH_WHEEL" "$CTX/wheels/"
MODEL=$(ls "$CTX/models" 2>/dev/null | head -n 1)  # the first bundled model
if [ -z "$MODEL" ] || [ ! -f "$CTX/models/$MODEL/config.json" ]; then
    MODEL=random-char
    echo "no bundled model yet: bundling a randomly initialised $MODEL (the Shakespeare shape)"
    "$PYTHON" - "$CTX/models/$MODEL" <<'PY'
import sys

import torch

from quillgpt.checkpoint import save_model
from quillgpt.config import GPTConfig
from quillgpt.model import GPT
from quillgpt.tokenizer import CharTokenizer

torch.manual_seed(0)
chars = [chr(i) for i in range(32, 127)] + ["\n"]
model = GPT(GPTConfig(vocab_size=len(chars), block_size=256, n_layer=6, n_head=6, n_embd=384))
save_model(sys.argv[1], model, CharTokenizer(chars), provenance={"init": "random", "seed": 0})
PY
fi
du -sh "$CTX"

step "build $IMAGE"
time "${PODMAN[@]}" build --format docker --network host "${ULIMITS[@]}" \
    --build-arg BASE="$BASE" --build-arg TORCH_INDEX_URL= --build-arg PIP_CA_BUNDLE=/etc/pip-ca.crt \
    --volume "$CA_BUNDLE:/etc/pip-ca.crt:ro" \
    -t "$IMAGE" "$CTX"
"${PODMAN[@]}" image ls "$IMAGE"

step "run $NAME on 127.0.0.1:$PORT"
"${PODMAN[@]}" rm -f "$NAME" >/dev/null 2>&1 || true
"${PODMAN[@]}" run -d --name "$NAME" --network host "${ULIMITS[@]}" \
    -e QUILL_HOST=127.0.0.1 -e QUILL_PORT="$PORT" -e QUILL_MODELS="$MODEL" "$IMAGE"
for _ in $(seq 1 120); do
    if curl -fsS "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1; then break; fi
    sleep 1
done

step "checks"
set -x
curl -fsS "http://127.0.0.1:$PORT/health"
echo
curl -fsS "http://127.0.0.1:$PORT/ready"
echo
curl -fsS "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' \
    -d '{"prompt": "ROMEO:", "max_tokens": 24, "seed": 1}'
echo
curl -fsS -X POST "http://127.0.0.1:$PORT/generate?prompt=ROMEO:&max_length=16"
echo
"${PODMAN[@]}" healthcheck run "$NAME" && echo "healthcheck: healthy"
"${PODMAN[@]}" exec "$NAME" id
"${PODMAN[@]}" exec "$NAME" python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
set +x
"${PODMAN[@]}" logs "$NAME" 2>&1 | tail -5
echo
echo "container check passed"
