#!/usr/bin/env bash
# Run the before/after comparison set of docs/results.md ("same numbers across the refactor")
# in a clone at one commit, one run after the other:
#   git clone -q . /tmp/before && git -C /tmp/before checkout -q <commit> && (cd /tmp/before && make setup)
#   scripts/same_numbers.sh /tmp/before before      # then the same for "after"
#   python3 scripts/diff_metrics.py /tmp/before before /tmp/after after
set -u
cd "$1"; L=$2
export METAMOE_CACHE_DIR=$1/.cache
for spec in "tiny metamoe" "tiny_text metamoe" "tiny fedavg" "tiny fedavg_moe" "tiny fedalign_moe" \
            "tiny ddome" "tiny oneshot_suite" "tiny unrestricted_moe_scratch" "tiny unrestricted_moe_same_start" "tiny metamoe_suite"; do
  set -- $spec
  .venv/bin/python -m metamoe.launch --benchmark "$1" --method "$2" --run-id "cmp-$L-$1-$2" \
    > "results-cmp-$L-$1-$2.log" 2>&1
  echo "$L $1 $2 rc=$?"
done
make demo ARGS="--run-id cmp-$L-demo" > "results-cmp-$L-demo.log" 2>&1
echo "$L demo rc=$?"
