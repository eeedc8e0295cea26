#!/usr/bin/env bash
# The README's reward-ensemble table (issue 38): DPO, MADPO and madpo_expected (MADPO with each
# pair's weight averaged over its margin's uncertainty), each at its own validation-tuned settings,
# under reward-margin noise, 3 seeds, judged on the sealed test split. Resumable.
#   0. runs/$NAME starts from runs/$FROM's documents, SFT model and pairs (bench/verdicts.sh made
#      them) and its DPO search: DPO never reads margins, so its search on the same SFT model and
#      pairs is the same search. Only the reward stage changes: an ensemble of $HEADS heads.
#   1. the stages from the reward model on (reward, score, policy, eval);
#   2. MADPO's and madpo_expected's validation searches on the ensemble's margins;
#   3. rm-noise at tuned settings, with --final.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${NAME:-verdict-ensemble}
FROM=${FROM:-verdict}
HEADS=${HEADS:-5}
COMMON=(--name "$NAME" "eval.temperatures=[0,1]" "compare.seeds=[0,1,2]" "reward.ensemble=$HEADS")
stamp() { echo "[$(date -u +%H:%M:%S)] $*"; }
if [ ! -d "runs/$NAME" ]; then
  stamp "from runs/$FROM: documents, SFT model, pairs, DPO's search"
  mkdir -p "runs/$NAME/tune"
  cp -a "runs/$FROM/base" "runs/$FROM/data" "runs/$FROM/sft" "runs/$FROM/pairs" "runs/$NAME/"
  cp -a "runs/$FROM/tune/dpo_gold" "runs/$NAME/tune/"
fi
# The stages in one process (the same stage functions as on Ray Train; measured beside other work,
# where a starved Ray Train worker can fail its health check).
stamp "stages"; madpo run "${COMMON[@]}" ray.backend=local
for loss in madpo madpo_expected; do
  if [ ! -f "runs/$NAME/tune/${loss}_gold/best_config.yaml" ]; then
    stamp "search $loss"; madpo tune --config "${loss}_gold" --name "$NAME" "eval.temperatures=[0,1]" "reward.ensemble=$HEADS"
  fi
done
stamp "rm-noise"; madpo study rm-noise --tuned --final "${COMMON[@]}"
stamp "done"
