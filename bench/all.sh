#!/usr/bin/env bash
# Every speed figure of the docs' Speed page (docs/speed.md), one bench after another (`make bench`), each table
# written to out/bench/<name>.txt as it is printed. About 25 minutes on a quiet 2-core CPU (the last line prints the
# time the run took); run it on an otherwise idle
# machine (the benches time paths interleaved in one process, but other jobs still widen the spread).
# `bash bench/all.sh scan-wiki memory` runs only the benches named. BENCH_THREADS (default 1) is the torch/OMP thread count of every bench except the 2-thread generation run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
T=${BENCH_THREADS:-1}
OUT=${BENCH_OUT:-out/bench}
mkdir -p "$OUT"
export OMP_NUM_THREADS=$T MKL_NUM_THREADS=$T
ONLY=" $* "
run() {  # run NAME ARGS...: one bench, its output also kept in $OUT/NAME.txt
    local name=$1; shift
    if [ "$ONLY" != "  " ] && [[ "$ONLY" != *" $name "* ]]; then return 0; fi
    echo "== $name: $*  (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
    "$PY" "$@" 2>&1 | tee "$OUT/$name.txt"
}
run start bench/bench_start.py --warm 5 --cold 1 --threads "$T"
run scan-wiki bench/bench_scan.py --sets wiki --paths bare1,plan,scan,tl,tlplan --reps 5 --threads "$T"
run scan-short bench/bench_scan.py --sets short --paths bare1,plan,scan,tlplan --reps 5 --threads "$T"
run scan-long bench/bench_scan.py --sets long --long 4096 --paths bare1,scan,tl --reps 3 --threads "$T"
run memory bench/bench_memory.py --tokens 4096 --counts 1,8,32 --threads "$T"
run generate bench/bench_generate.py --reps 3 --threads "$T"
OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 run generate-2threads bench/bench_generate.py --reps 3 --threads 2
run wemask bench/bench_wemask.py --reps 3 --threads "$T"
run finetune bench/bench_finetune.py --model smollm2-135m --reps 4 --threads "$T"
if [ -f bench/bench_report.py ]; then run report bench/bench_report.py; fi
echo "== done in $((SECONDS / 60)) min $((SECONDS % 60)) s: tables in $OUT/"
