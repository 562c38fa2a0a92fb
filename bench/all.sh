#!/usr/bin/env bash
# Every speed figure of the docs' Speed page (docs/speed.md), one bench after another (`make bench`): each bench's
# output is kept in out/bench/<name>.txt as it is printed and turned into docs/bench/<name>.md (bench/fragment.py:
# the conditions of the run, i.e. date, CPU, threads and wall time, then the bench's tables),
# which the Speed page includes; docs/bench/targets.md collects the verdicts. About 25 minutes on a quiet 2-core
# CPU (the last line prints the time the run took; and docs/bench/total.md keeps it); run it on an
# otherwise idle machine (the benches time paths interleaved in one process, but other jobs still widen the spread).
# `bash bench/all.sh scan-wiki memory` runs only the benches named. BENCH_THREADS (default 1) is the torch/OMP thread count of every bench except the 2-thread generation run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
T=${BENCH_THREADS:-1}
OUT=${BENCH_OUT:-out/bench}
mkdir -p "$OUT"
export OMP_NUM_THREADS=$T MKL_NUM_THREADS=$T
ONLY=" $* "
run() {  # run NAME ARGS...: one bench, its output kept in $OUT/NAME.txt and written to docs/bench/NAME.md
    local name=$1; shift
    if [ "$ONLY" != "  " ] && [[ "$ONLY" != *" $name "* ]]; then return 0; fi
    local before start=$SECONDS
    before=$(cut -d' ' -f1-3 /proc/loadavg)
    echo "== $name: $*  (load average: $before)"
    "$PY" "$@" | tee "$OUT/$name.txt"
    "$PY" bench/fragment.py "$name" "$OUT/$name.txt" --threads "${OMP_NUM_THREADS}" \
        --seconds $((SECONDS - start))
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
run report bench/bench_report.py --reps 5 --threads "$T"
run weights bench/bench_weights.py --reps 2 --threads 1 2
"$PY" bench/fragment.py --targets
"$PY" bench/fragment.py --total "$SECONDS" "$*"  # a partial run's time is kept only until a full run
echo "== done in $((SECONDS / 60)) min $((SECONDS % 60)) s: tables in $OUT/ and docs/bench/"
