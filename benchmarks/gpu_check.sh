#!/usr/bin/env bash
# The GPU check, for whenever an accelerator is lent: `bash benchmarks/gpu_check.sh`, after the README's install
# command, on one CUDA device (CUDA_VISIBLE_DEVICES picks it). In under 10 minutes on an H100 it
#   1. runs the kernel tests on the hardware (Triton compiled for the GPU, not the CPU interpreter),
#   2. runs the GPU benchmarks (`pytest benchmarks/ --benchmark-only`),
#   3. times one sampling step at the SD1.5 and the SDXL architectures' real sizes, random weights, K = 4 (paper
#      Table 5: LRM against SPM against decoding + a pixel reward; `lpo timing step-cost-arch`), and the LRM step
#      under noise ensembling, M LRM passes for M = 1, 4, 16 (timing.ensemble_draws; step_cost_<arch>_ensembling.csv),
#   4. times one optimizer step of each trainer (LRM, LPO, Diffusion-DPO) at those sizes, gradient checkpointing
#      off and on, with its peak memory (`lpo timing train-step-arch`; `lpo plan` turns them into hours),
# and writes what it measured, with the GPU's identity, the date, the versions and each exact command, under
# reports/gpu/<device>/ (summary.md first). Each part has its own time limit (seconds; override with
# GPU_CHECK_LIMITS="tests benchmarks sd15 sdxl train_sd15 train_sdxl"), so a hang costs that part alone; a failed
# part does not stop the others. Exit status: 0 when every part passed, 1 when one failed or ran out of time, 2 when
# nothing could run.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# Installed? One line naming the first missing distribution.
missing=$("$PYTHON" - <<'PY' 2>/dev/null || echo python
import importlib.util
needed = {"torch": "torch", "triton": "triton", "diffusers": "diffusers", "transformers": "transformers",
          "open_clip": "open-clip-torch", "pytest": "pytest", "pytest_benchmark": "pytest-benchmark",
          "lpo": "lpo (this project)", "lpo_kernels": "lpo (this project)"}
print(next((dist for name, dist in needed.items() if importlib.util.find_spec(name) is None), ""))
PY
)
if [ -n "$missing" ]; then
    echo "gpu_check: $missing is not installed in $PYTHON: run the README's install command first" \
         "(python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.lock -e .)" >&2
    exit 2
fi
if ! "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "gpu_check: no CUDA device is visible (torch.cuda.is_available() is False): run it on a machine with an" \
         "NVIDIA GPU and its driver" >&2
    exit 2
fi

read -r LIMIT_TESTS LIMIT_BENCH LIMIT_SD15 LIMIT_SDXL LIMIT_TRAIN_SD15 LIMIT_TRAIN_SDXL \
    <<<"${GPU_CHECK_LIMITS:-120 150 90 180 150 240}"
device_name=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name())")
device=$(echo "$device_name" | tr 'A-Z' 'a-z' | sed -E 's/[^a-z0-9]+/-/g; s/^-|-$//g')
out="reports/gpu/$device"
mkdir -p "$out"
started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
{
    echo "date: $started"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "host: $(uname -srm)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm --format=csv 2>&1
    "$PYTHON" -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__,
'cuda', torch.version.cuda); print('triton', triton.__version__); print('device', torch.cuda.get_device_name())"
    echo
    "$PYTHON" -m pip freeze 2>&1
} >"$out/system.txt"

declare -a NAMES STATUS SECONDS_TAKEN COMMANDS
part() {  # part NAME LIMIT COMMAND...: runs COMMAND under its limit, its output in $out/NAME.log
    local name=$1 limit=$2
    shift 2
    local begin=$SECONDS status
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    case $? in
        0) status=passed ;;
        124 | 137) status="out of time (${limit}s)" ;;
        *) status=failed ;;
    esac
    NAMES+=("$name") STATUS+=("$status") SECONDS_TAKEN+=("$((SECONDS - begin))") COMMANDS+=("$*")
    echo "   $status in $((SECONDS - begin))s; log: $out/$name.log"
}

# TRITON_INTERPRET unset: the kernels compile for the GPU (the test modules set it only when CUDA is absent).
part kernel_tests "$LIMIT_TESTS" env -u TRITON_INTERPRET "$PYTHON" -m pytest -q -p no:cacheprovider \
    tests/test_reward_head.py
part benchmarks "$LIMIT_BENCH" env -u TRITON_INTERPRET "$PYTHON" -m pytest -q -p no:cacheprovider benchmarks/ \
    --benchmark-only --benchmark-storage="file://./$out/benchmarks" --benchmark-json="$out/benchmarks.json"
part step_cost_sd15 "$LIMIT_SD15" "$PYTHON" -m lpo timing step-cost-arch --arch sd15 --out "$out"
part step_cost_sdxl "$LIMIT_SDXL" "$PYTHON" -m lpo timing step-cost-arch --arch sdxl --out "$out"
# LPO and Diffusion-DPO at their configs' per-device batches; the LRM at sd15's 16 and at 4, which fits a 24 GiB card,
# and at 1 and 2 for sdxl (its config's 4 needs more than 80 GiB without checkpointing; `lpo plan` scales from 2).
# Each setting checkpointing off and on, 3 timed steps after 2 warm-up; the report is rewritten after each precision's
# settings, so a part that runs out of time keeps what it measured.
part train_step_sd15 "$LIMIT_TRAIN_SD15" "$PYTHON" -m lpo timing train-step-arch --arch sd15 \
    --per-device-batch lrm=4 lrm=16 lpo=10 diffusion_dpo=4 --steps 3 --out "$out"
part train_step_sdxl "$LIMIT_TRAIN_SDXL" "$PYTHON" -m lpo timing train-step-arch --arch sdxl \
    --per-device-batch lrm=1 lrm=2 lpo=4 diffusion_dpo=4 --steps 3 --out "$out"

failed=0
{
    echo "# GPU check on $device_name"
    echo
    echo "Run by \`bash benchmarks/gpu_check.sh\` at $started (commit $(git rev-parse --short HEAD 2>/dev/null))."
    echo "Identity and versions: \`system.txt\`; each part's output: \`<part>.log\`."
    echo
    echo "| part | result | seconds | command |"
    echo "|---|---|---|---|"
    for i in "${!NAMES[@]}"; do
        echo "| ${NAMES[$i]} | ${STATUS[$i]} | ${SECONDS_TAKEN[$i]} | \`${COMMANDS[$i]}\` |"
        [ "${STATUS[$i]}" = passed ] || failed=1
    done
    echo
    for report in step_cost_sd15 step_cost_sdxl train_step_sd15 train_step_sdxl; do
        [ -f "$out/$report.md" ] && { cat "$out/$report.md"; echo; }
    done
} >"$out/summary.md"

echo
echo "==================== GPU check: $out/summary.md ===================="
sed -n '/^| part/,/^$/p' "$out/summary.md"
grep -h -E "^(kernel_tests|benchmarks)|passed|failed|error" "$out/kernel_tests.log" "$out/benchmarks.log" 2>/dev/null |
    grep -E "[0-9]+ (passed|failed)" | sed 's/^/  pytest: /'
for arch in sd15 sdxl; do
    [ -f "$out/step_cost_$arch.md" ] && grep -E "^(SPM step / LRM step|LRM step with noise ensembling)" \
        "$out/step_cost_$arch.md" | sed "s/^/  $arch: /"
done
exit $failed
