#!/usr/bin/env bash
# The tests that spawn several training processes (gloo process groups: DDP, FSDP, beta-DPO's
# gathered statistics, a SIGKILLed and resumed worker), run N times in a row (default 20), to show
# they set up and tear down their process groups cleanly: a rank that leaves while gloo still has
# work for it aborts its peer ("terminate called without an active exception").
# Usage: bash bench/repeat_multiprocess_tests.sh [N]     (about 80 s a round on 2 cores)
set -uo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-20}"
tests=(tests/engine/test_fsdp.py
       "tests/test_beta_dpo.py::test_two_workers_with_accumulation_2_equal_one_worker_with_accumulation_4"
       "tests/test_beta_dpo.py::test_killed_and_resumed_run_ends_as_the_uninterrupted_one")
failed=0
for i in $(seq 1 "$rounds"); do
  start=$(date +%s)
  if HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 .venv/bin/python -m pytest -q -p no:cacheprovider "${tests[@]}" \
       > "/tmp/multiprocess_round_$i.log" 2>&1; then status=passed; else status=FAILED; failed=$((failed + 1)); fi
  echo "round $i/$rounds: $status ($(tail -1 "/tmp/multiprocess_round_$i.log" | tr -d '=')) in $(( $(date +%s) - start )) s"
done
echo "$((rounds - failed)) of $rounds rounds passed"
[ "$failed" -eq 0 ]
