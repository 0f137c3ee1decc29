#!/usr/bin/env bash
# DESIGN §8's GPU checks in one command, for a lent GPU machine (README, "GPU checks"):
#   1. the expert FFN's achieved TFLOP/s against the device's measured bf16 matmul peak (bench.accelerator);
#   2. one process, a 2-shard cluster and transformers.generate on bench-m, bfloat16 on the device,
#      concurrency 1 and 32 (moe-serve bench), for the same ratios as on the CPU.
# Made for the device tool's `run` (its folder $OUT comes back); carry .whl (`make device-wheels`), which
# holds what the machine's Python lacks. Results and logs go to $OUT, or bench/out/device.
#
#   DEVICE=cuda PRESET=bench-m REQUESTS=64 BENCH_LIMIT_S=420 bash bench/device_check.sh
set -uo pipefail

out=${OUT:-bench/out/device}
device=${DEVICE:-cuda}
preset=${PRESET:-bench-m}
requests=${REQUESTS:-64}
bench_limit_s=${BENCH_LIMIT_S:-420}
work=${WORK_DIR:-/tmp/moe-device-check}
python=${PYTHON:-python3}
wheels=${WHEELS:-.whl}
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if compgen -G "$wheels/*.whl" > /dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" \
        "$wheels"/*.whl || exit 1
    # ahead of the image's site-packages: the protobuf and grpcio our generated code needs win; torch is the image's
    export PYTHONPATH="$PYTHONPATH:$work/site"
fi

{ nvidia-smi 2>&1 || echo "no nvidia-smi"; "$python" -c 'import torch; print("torch", torch.__version__,
"cuda", torch.version.cuda, "available", torch.cuda.is_available())'; } > "$out/machine.txt"
cat "$out/machine.txt"

status=0
"$python" -m bench.accelerator --device "$device" --preset "$preset" ${ACCELERATOR_ARGS:-} \
    --out "$out/accelerator.json" || status=1

# The bench is bounded so that its log and the servers' logs still come back when it overruns.
timeout "$bench_limit_s" "$python" -m moe_serve.cli bench --preset "$preset" --device "$device" --dtype bfloat16 \
    --configs ${CONFIGS:-local cluster-2 transformers} --concurrency 1 32 --requests "$requests" \
    ${BENCH_ARGS:-} --work-dir "$work/bench" --out "$out/bench.json" 2>&1 | tee "$out/bench.log" \
    | grep -a -o -E '\{"config.*|wrote .*|Error.*|error.*' || status=1
for log in "$work"/bench/runs/*/up.log; do
    [ -f "$log" ] && { echo "== $log"; tail -n 40 "$log"; }
done > "$out/services.log" 2>&1
exit $status
