#!/usr/bin/env bash
# Every registered method against the unmodified model on the four benchmark tasks of docs/methods.md, one model:
#
#     bash tools/methods_run.sh MODEL [OUT]      # e.g. smollm2-135m, gemma-3-270m; OUT defaults to out/methods
#
# Four `melayer compare` runs (XSTest 450, IFEval first 50, MMLU anatomy + astronomy 0-shot, ARC-Easy first 200),
# one torch thread each, every condition on the same samples; each resumes where it stopped. Then the tables:
# the summary over all four (tools/methods_table.py --summary) and each compare's full table.
set -euo pipefail
m=${1:?usage: bash tools/methods_run.sh MODEL [OUT]}
out=${2:-out/methods}
cd "$(dirname "$0")/.."
MELAYER=${MELAYER:-.venv/bin/melayer}
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
M=(-M wemask:rate=0.01 -M wemask_before:rate=0.01 -M wemask_random_dims:rate=0.01 -M wemask_other_token:rate=0.01
   -M wemask_me_only:rate=0.01 -M act -M zerotuning -M set_mean -M set_zero)
run() {
  local name=$1 start=$SECONDS; shift
  echo "== $m $name: started $(date -u +%H:%M) UTC, load average $(cut -d' ' -f1-3 /proc/loadavg)"
  "$MELAYER" compare -m "$m" "${M[@]}" -o "$out/$m-$name" "$@"
  echo "== $m $name: $((SECONDS - start)) s, load average $(cut -d' ' -f1-3 /proc/loadavg)"
}
run xstest -t xstest --max-new-tokens 24
run ifeval -t ifeval -n 50 --max-new-tokens 256
run mmlu -t mmlu --subjects anatomy,astronomy --num-fewshot 0
run arc200 -t arc_easy -n 200
"$PY" tools/methods_table.py --summary "$out/$m-arc200:acc" "$out/$m-arc200:acc_norm" "$out/$m-ifeval:prompt_level_strict_acc" \
  "$out/$m-ifeval:inst_level_strict_acc" "$out/$m-xstest:over_refusal" "$out/$m-xstest:unsafe_refusal" "$out/$m-mmlu:acc"
for t in arc200 ifeval xstest mmlu; do echo; "$PY" tools/methods_table.py "$out/$m-$t"; done
