#!/usr/bin/env bash
# The checks that need a GPU, as one script for a session lent a device machine (15 minutes of device
# time in all): the CUDA tests (accumulation core, checkpoint snapshot from GPU memory), the async save's
# stall from GPU memory, and the CPU restore and save arms on that machine's 16 cores.
#
# Its image has torch with CUDA, safetensors, fsspec, numpy, pytest and hypothesis, but not Ray, pydantic,
# blake3 or cryptography. Those travel as wheels in .whl/ (ignored by git), fetched here first:
#     bash benchmarks/device_check.sh --fetch-wheels
# then through the device tool, with carry [".whl"] and a timeout that leaves room for a rerun:
#     bash benchmarks/device_check.sh
# Everything lands in $OUT (the device tool's folder; bench-out/device elsewhere).
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=(pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
        typing-extensions==4.15.0 blake3==1.0.11 cryptography==50.0.2 cffi==2.0.0 pycparser==3.0)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    platforms=()
    for p in manylinux_2_34_x86_64 manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
        platforms+=(--platform "$p")
    done
    exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "${WHEELS[@]}"
fi

OUT=${OUT:-bench-out/device}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "device_check: installing .whl/ failed (fetch the wheels first)"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
echo "cpus: $(nproc)" | tee -a "$OUT/gpu.txt"
timeout 180 python3 -m pytest -q -m gpu tests/unit 2>&1 | tee "$OUT/tests.log" || status=1
timeout 120 python3 -m benchmarks checkpoint --gpu --size-mb 1024 --repeats 5 --threads 8 --out "$OUT" \
    > "$OUT/gpu.log" 2>&1 || { status=1; tail -5 "$OUT/gpu.log"; }
for arms in restores saves; do
    timeout 100 python3 -m benchmarks checkpoint --$arms-only --repeats 5 --threads 8 \
        > "$OUT/${arms}_16cpu.json" 2> "$OUT/${arms}_16cpu.log" || { status=1; tail -5 "$OUT/${arms}_16cpu.log"; }
done
python3 - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for name in ("checkpoint_gpu.json", "restores_16cpu.json", "saves_16cpu.json"):
    try:
        ratios = json.loads((out / name).read_text())["ratios"]
    except (OSError, ValueError, KeyError) as exc:
        print(f"{name}: no result ({type(exc).__name__})")
        continue
    print(name)
    for label, value in ratios.items():
        print(f"  {value:8.3f}  {label}")
EOF
exit $status
