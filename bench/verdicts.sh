#!/usr/bin/env bash
# The README's verdict and rm-noise tables, re-measured on the sealed test split (issue 32, item 6).
# Every command is resumable: rerunning this script reuses finished stages, searches and trainings.
#   1. the default run's stages (tier medium), and each method's validation search (`<loss>_gold`,
#      beta x lr by the validation gold at the worse of T=0 and T=1);
#   2. tuned protocol: every tier, ablations, each method at its own search's settings, 3 seeds;
#   3. rm-noise at tuned settings, 3 seeds;
#   4. matched protocol: every method at beta 0.1 and each lr of a grid, 3 seeds.
# Steps 2-4 run with --final: trainings never read test; only their judging does, once, recorded in
# each run's final_readings.jsonl. Measured on 2 cores: see the README for the times.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${NAME:-verdict}
COMMON=(--name "$NAME" "eval.temperatures=[0,1]" "compare.seeds=[0,1,2]")
stamp() { echo "[$(date -u +%H:%M:%S)] $*"; }
stamp "stages"; madpo run "${COMMON[@]}"
for loss in dpo ipo beta_dpo madpo; do
  if [ ! -f "runs/$NAME/tune/${loss}_gold/best_config.yaml" ]; then
    stamp "search $loss"; madpo tune --config "${loss}_gold" --name "$NAME" "eval.temperatures=[0,1]"
  fi
done
stamp "tuned tiers"; madpo compare --tiers high,medium,low --tuned --ablations --final "${COMMON[@]}"
stamp "rm-noise"; madpo study rm-noise --tuned --final "${COMMON[@]}"
stamp "lr grid"; madpo compare --lr-grid 1e-5,5e-5,2e-4 --final "${COMMON[@]}"
stamp "done"
