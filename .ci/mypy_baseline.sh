#!/usr/bin/env bash
# The type checker's baseline: mypy over mae_lab/ may report no more errors than .ci/mypy_baseline.txt records, so
# the count can only go down. When it drops, lower the file in the same commit (--update writes the current count).
# Usage: .ci/mypy_baseline.sh [--update]   (PYTHON defaults to .venv/bin/python, with mypy from the test extra)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
count=$("$PY" -m mypy mae_lab/ 2>&1 | grep -c ': error:' || true)
if [ "${1:-}" = "--update" ]; then
  echo "$count" > .ci/mypy_baseline.txt
  echo "mypy: baseline set to $count errors"
  exit 0
fi
base=$(cat .ci/mypy_baseline.txt)
if [ "$count" -gt "$base" ]; then
  echo "mypy: $count errors in mae_lab/, more than the baseline $base (.ci/mypy_baseline.txt): fix the new ones"
  exit 1
fi
echo "mypy: $count errors in mae_lab/ (baseline $base)"
if [ "$count" -lt "$base" ]; then
  echo "mypy: below the baseline: run .ci/mypy_baseline.sh --update and commit .ci/mypy_baseline.txt"
fi
