#!/usr/bin/env bash
# Download, into .whl/ (ignored), exactly the wheels the GPU device machine lacks for snnet: its image
# has torch 2.11 (CUDA 13), timm, lightning, torchmetrics, onnx, onnxruntime, numpy, PyYAML, requests,
# anyio, click, h11, uvloop, ... (/work/.library/device/KINDS.md) but not the CLI's jsonargparse nor
# `snnet serve`'s litserve stack. Versions are the ones installed in this checkout's environment (what
# the tests ran with), for CPython 3.12 on manylinux x86_64, no dependencies resolved by pip (--no-deps:
# the list below is the closure minus what the device has). Then copies ../shared/{data,anchors} into
# .device_shared/ (ignored) for tools/device_check.py (SNNET_DATA_DIR, SNNET_ANCHOR_DIR).
#
#   tools/fetch_device_wheels.sh            # versions of ./.venv (else python3); PYTHON=... for another
#   SHARED=/work/shared tools/fetch_device_wheels.sh
#
# wandb is left out on purpose: nothing the device runs logs to it (configs/cifar10_resnet.yaml uses
# the CSVLogger) and its wheel alone would take most of the 64 MiB a device call may carry.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then PYTHON=python3; [ -x "$ROOT/.venv/bin/python" ] && PYTHON=$ROOT/.venv/bin/python; fi
SHARED=${SHARED:-$ROOT/../shared}
[ -d "$SHARED/data" ] || SHARED=/work/shared
PACKAGES=(
  jsonargparse docstring-parser typeshed-client           # snnet fit/test (LightningCLI) and its signatures extra
  litserve fastapi starlette uvicorn pyzmq python-multipart  # snnet serve
  pydantic pydantic-core annotated-types typing-inspection opentelemetry-api typing-extensions  # fastapi's needs
)
cd "$ROOT"
rm -rf .whl && mkdir -p .whl
specs=()
for name in "${PACKAGES[@]}"; do
  specs+=("$name==$("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
echo "downloading: ${specs[*]}"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 -d .whl "${specs[@]}"
count=$(ls .whl/*.whl | wc -l)
[ "$count" -eq "${#PACKAGES[@]}" ] || { echo "expected ${#PACKAGES[@]} wheels, got $count" >&2; exit 1; }

rm -rf .device_shared && mkdir -p .device_shared
cp -r "$SHARED/data" "$SHARED/anchors" .device_shared/
du -sh .whl .device_shared
echo "travels with the working tree: $(du -cms .whl .device_shared | tail -1 | cut -f1) MiB of the 64 (plus the tracked files)"
