#!/usr/bin/env bash
# Follow a run's log on one worker (0 by default: the one that writes results and plots).
#   tpu_scripts/logs.sh --name cpt-jax --config configs/paper/qwen2_5_vl_7b_grpo.yaml [--worker 1]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$here/lib.sh"
usage() { echo "usage: $0 --config FILE [--worker N] [--lines N]"; usage_common; }
parse_common "$@"
config="" worker=0 lines=50
set -- "${EXTRA[@]+"${EXTRA[@]}"}"
while (($#)); do
  case "$1" in
    --config) config="$2"; shift 2 ;;
    --worker) worker="$2"; shift 2 ;;
    --lines) lines="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
if [[ -z "$config" ]]; then echo "--config is required" >&2; exit 2; fi
tpu_vm ssh "$NAME" --worker="$worker" \
  --command "tail -n $lines -F ~/cpt_jax/logs/$(basename "$config" .yaml).log"
