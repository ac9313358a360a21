#!/bin/bash
# One command for a lent GPU (issue 29), offline, at most 8 minutes: a preflight (the card; whether torch, timm,
# transformers and Triton's compiler work), the CUDA tests (tests/test_cuda.py), then the benchmark
# (benchmarks/gpu.py: HF fp16 + GradScaler, HF bf16, HF bf16 compiled, mae-lab bf16 eager and compiled).
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine
#   bash benchmarks/gpu_check.sh --smoke    # on the CPU: the same steps at toy size (tests/test_gpu_check.py)
#
# Everything it prints goes to $OUT/gpu_check.log when OUT is set (else a temp folder, named at the end), with the
# tests' JUnit XML and one JSON line per benchmark variant beside it. PYTHON picks the interpreter (default: the
# checkout's .venv if it has one, else python3). Exit 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
DIR="${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
mkdir -p "$DIR"
exec > >(tee -a "$DIR/gpu_check.log") 2>&1
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  [ -x .venv/bin/python ] && PYTHON=.venv/bin/python
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ "$SMOKE" = 1 ] && export CUDA_VISIBLE_DEVICES=""
START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET_S:-480}
left() { echo $(( BUDGET - (SECONDS - START) )); }
STATUS=0

echo "== preflight ($(date -u +%H:%M:%SZ), $PYTHON, budget ${BUDGET}s, output in $DIR)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 90 "$PYTHON" - "$SMOKE" <<'EOF' || STATUS=1
import importlib, sys
smoke = sys.argv[1] == "1"
import torch
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, cuda available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"card: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, "
          f"{torch.cuda.device_count()} visible, bf16 {torch.cuda.is_bf16_supported()}")
elif not smoke:
    sys.exit("no CUDA device: run with --smoke on the CPU")
for name in ("timm", "transformers", "pytest", "sklearn", "webdataset", "sqlmodel", "typer", "optuna", "scipy"):
    try:
        print(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except ImportError:
        why = {"transformers": "the HF variants will be skipped", "pytest": "the CUDA tests will be skipped"}
        print(f"{name}: MISSING" + (f" ({why[name]})" if name in why else ""))
import mae_lab.train.pretrain  # noqa: F401  (the package and its dependencies import)
print("mae_lab imports")
if torch.cuda.is_available():
    try:
        import triton
        f = torch.compile(lambda x: torch.sin(x) * 2 + 1)
        x = torch.randn(1024, device="cuda")
        ok = torch.allclose(f(x), torch.sin(x) * 2 + 1)
        print(f"triton {triton.__version__}: inductor compiled a CUDA kernel, {'correct' if ok else 'WRONG'}")
    except Exception as exc:  # noqa: BLE001
        print(f"triton / inductor: FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
else:
    print("triton: not checked (no CUDA)")
EOF
[ "$STATUS" = 0 ] || { echo "preflight failed"; exit 1; }

echo "== CUDA tests ($(left)s left)"
if "$PYTHON" -c "import pytest" 2>/dev/null; then
  timeout $(( $(left) > 400 ? 200 : $(left) / 2 )) "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    --junitxml="$DIR/test_cuda.xml" || STATUS=1
else
  echo "pytest is missing: CUDA tests skipped"; STATUS=1
fi

echo "== benchmark ($(left)s left)"
rm -f "$DIR/gpu.jsonl"
BENCH_ARGS=(--json "$DIR/gpu.jsonl")
[ "$SMOKE" = 1 ] && BENCH_ARGS+=(--smoke)
timeout $(( $(left) > 10 ? $(left) - 5 : 5 )) "$PYTHON" benchmarks/gpu.py "${BENCH_ARGS[@]}" || STATUS=1

echo "== done in $(( SECONDS - START ))s: $([ "$STATUS" = 0 ] && echo PASS || echo FAIL); output in $DIR"
exit $STATUS
