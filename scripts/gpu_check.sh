#!/usr/bin/env bash
# The GPU checks of issue 13 in one command, for a session that is lent a GPU (one H200 here):
# the GPU test suite (pytest -m gpu) and `harness bench --device cuda --json`. No paper-scale
# smoke: CIFAR needs data that the GPU machine (no network) does not have; mnist5k, the largest
# embedded set, is what the bench trains on.
#
#   1. Here, with network, once per checkout (about 25 MB of wheels into .whl/, which git ignores
#      through .git/info/exclude): the packages the harness needs that the GPU machine's image
#      lacks (MLflow, pydantic, mlxtend, optuna, ...), for its Python 3.12 on x86-64:
#        scripts/gpu_check.sh --fetch-wheels
#   2. On the GPU machine (device tool): run(command="bash scripts/gpu_check.sh", carry=[".whl"],
#      timeout_s=600): an estimated 4 minutes of tests and 2 of bench (each step has its own timeout,
#      360 s and 180 s). Steps can be run alone: `bash scripts/gpu_check.sh tests` (the suite),
#      `bash scripts/gpu_check.sh tests -k pool` (pytest arguments after `tests`: tests/gpu with
#      them), `bash scripts/gpu_check.sh bench`.
#
# Results go to $OUT (the device tool's folder; ./gpu-check-out elsewhere): env.txt, pytest.log,
# junit.xml, bench.json, bench.log, summary.txt. Exit code: 0 if every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."

# Versions known to work with this checkout (its CI environment), cp312 manylinux x86-64 wheels.
WHEELS="mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 SQLAlchemy==2.1.9 alembic==1.20.1 Mako==1.4.3
  cachetools==7.3.3 databricks-sdk==0.162.0 google-auth==2.63.0 google-api-core==2.44.0
  googleapis-common-protos==1.76.0 proto-plus==1.29.0 pyasn1==0.6.3 pyasn1_modules==0.4.2 rsa==4.7.2
  cryptography==48.0.0 cffi==2.0.0 pycparser==3.0 importlib_metadata==9.1.0 fastapi==0.165.0
  starlette==1.10.0 sniffio==1.3.1 sqlparse==0.6.1 opentelemetry-api==1.45.2
  opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2 opentelemetry-semantic-conventions==0.66b2
  opentelemetry-exporter-prometheus==0.66b2 protobuf==7.36.2 pydantic==2.13.4 pydantic_core==2.46.4
  annotated-types==0.7.0 typing-inspection==0.4.2 typing_extensions==4.16.0 mlxtend==0.25.0
  optuna==5.0.0 colorlog==6.12.0"

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  mkdir -p .whl
  grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  plats=""
  for p in manylinux_2_34_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do plats="$plats --platform $p"; done
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plats \
    -d .whl $WHEELS || exit 1
  echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/ (carry it: carry=[\".whl\"])"
  exit 0
fi

OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 GIT_PYTHON_REFRESH=quiet
step="${1:-all}"; shift || true
status=0
say() { echo "$*" | tee -a "$OUT/summary.txt"; }

# --- environment: carried wheels, the harness itself ----------------------------------------
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { say "FAILED: installing the carried wheels"; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$OUT/env.txt" 2>&1; then
  # no editable install: the harness from this folder, the methods through HARNESS_PLUGINS
  export PYTHONPATH="$PWD:${PYTHONPATH:-}" HARNESS_PLUGINS="baselines.kd,baselines.cfl,baselines.scratch,baselines.teachers"
  echo "editable install failed: PYTHONPATH and HARNESS_PLUGINS instead" >>"$OUT/env.txt"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  nproc; python3 --version
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), torch.cuda.device_count())"
  python3 -c "import harness.cli, mlflow, pydantic; from harness.methods.base import discover; print('methods', discover().names())"
} >>"$OUT/env.txt" 2>&1 || { say "FAILED: the harness does not import (see env.txt)"; tail -20 "$OUT/env.txt"; exit 1; }
tail -4 "$OUT/env.txt"

# --- the GPU test suite ----------------------------------------------------------------------
# cheapest and most telling first, so that a timeout cuts the end; the quick bench test is left
# out here (the full bench below is checked by the same function)
SUITE="tests/gpu/test_precision_gpu.py tests/gpu/test_loop.py tests/gpu/test_pool.py tests/gpu/test_agreement.py
  tests/gpu/test_matrix.py"
if [[ "$step" == all || "$step" == tests ]]; then
  t0=$SECONDS
  # shellcheck disable=SC2086
  if [[ $# -eq 0 ]]; then set -- $SUITE; else set -- tests/gpu "$@"; fi
  timeout 360 python3 -m pytest -m gpu -o addopts="" -v -rfEs --durations=12 -p no:cacheprovider \
    --junitxml="$OUT/junit.xml" "$@" 2>&1 | tee "$OUT/pytest.log"
  rc=${PIPESTATUS[0]}
  say "pytest -m gpu: exit $rc in $((SECONDS - t0)) s: $(tail -1 "$OUT/pytest.log")"
  [[ $rc -eq 0 ]] || status=1
fi

# --- the GPU bench ---------------------------------------------------------------------------
if [[ "$step" == all || "$step" == bench ]]; then
  t0=$SECONDS
  timeout 180 python3 -m harness.cli bench --device cuda --json >"$OUT/bench.json" 2>"$OUT/bench.log"
  rc=$?
  say "harness bench --device cuda: exit $rc in $((SECONDS - t0)) s"
  if [[ $rc -eq 0 ]]; then
    python3 - "$OUT/bench.json" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
from harness.bench import GPU_TARGETS, PACK_K, TARGETS
out = json.load(open(sys.argv[1]))
for key, (op, target) in {**TARGETS, **GPU_TARGETS}.items():
    ok = out[key] <= target if op == "<=" else out[key] >= target
    print(f"  {key:<16} {out[key]:8.3f}  target {op} {target} ({'meets' if ok else 'MISSES'})")
for key in ("images_per_second", "bare_images_per_second", "trials_per_hour_1", f"trials_per_hour_{PACK_K}",
            "gpu_peak_mb", "trial_gpu_peak_mb", "cuda_max_allocated_mb", "gpu"):
    print(f"  {key:<24} {out.get(key)}")
PY
    python3 -m tests.gpu.test_bench_gpu "$OUT/bench.json" 2>&1 | tail -3 | tee -a "$OUT/summary.txt"
    [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
  else
    tail -15 "$OUT/bench.log"; status=1
  fi
fi
exit $status
