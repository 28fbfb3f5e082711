#!/usr/bin/env bash
# One command for a machine with an accelerator (an NVIDIA GPU with JAX + CUDA): train-step
# tokens/s and MFU, compiled memory, attention implementations and decoding speed, written as
# device.json and device.md into $OUT (or experiments/results/gpu/DATE_DEVICE). Under 8 minutes on
# one H100/H200 at the default nano_125m preset; installs nothing from the network.
#
#   benchmarks/device.sh [--preset=nano_125m] [--dtype=bfloat16] [--steps=10] [any benchmarks/device.py flag]
#   benchmarks/device.sh --preset=tiny --steps=2 --new_tokens=16   # the CPU smoke run tests/test_device_script.py makes
#
# mtp_jax needs ml_collections and tensorboardX, which a bare JAX image may lack: they are
# installed from benchmarks/wheels/ (pure-Python wheels, ~160 kB) into a private directory, never
# into the system. Their own needs (absl-py, PyYAML, numpy, packaging, protobuf) are expected to be
# there. To refresh the wheels, on any machine with network access:
#   pip download --no-deps --only-binary=:all: -d benchmarks/wheels ml_collections==1.1.0 tensorboardX==2.6.5
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c "import ml_collections, tensorboardX" 2>/dev/null; then
    site=$(mktemp -d "${TMPDIR:-/tmp}/mtp_jax_wheels.XXXXXX")
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" benchmarks/wheels/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

device=$("$PYTHON" -c "import jax; print(jax.devices()[0].device_kind)" | tr -c 'A-Za-z0-9.\n' '_')
out=${OUT:-experiments/results/gpu/$(date -u +%Y-%m-%d)_$device}
export PYTHONUNBUFFERED=1
"$PYTHON" benchmarks/device.py --out="$out" "$@"
echo "results: $out/device.json, $out/device.md"
