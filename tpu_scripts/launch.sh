#!/usr/bin/env bash
# Start the training on every worker at once (multi-host: --distributed, each host finds the
# others itself), detached, logging to ~/cpt_jax/logs/<run>.log on each worker.
#   tpu_scripts/launch.sh --name cpt-jax --config configs/paper/qwen2_5_vl_7b_grpo.yaml \
#       [--resume] [key=value ...]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$here/lib.sh"
usage() { echo "usage: $0 --config FILE [--resume] [key=value ...]"; usage_common; }
parse_common "$@"
config="" args=()
set -- "${EXTRA[@]+"${EXTRA[@]}"}"
while (($#)); do
  case "$1" in
    --config) config="$2"; shift 2 ;;
    --resume) args+=(--resume); shift ;;
    *=*) args+=("$1"); shift ;;
    *) echo "unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
if [[ -z "$config" ]]; then echo "--config is required" >&2; exit 2; fi
run_name="$(basename "$config" .yaml)"
quoted="$(printf '%q ' --config "$config" "${args[@]+"${args[@]}"}")"
on_all_workers "cd ~/cpt_jax && mkdir -p logs && . .venv/bin/activate && \
TPU_SKIP_MDS_QUERY=1 JAX_PLATFORMS=tpu nohup python -m cpt_jax.train --distributed $quoted \
> logs/$run_name.log 2>&1 & echo \"worker \$(hostname): started, pid \$!\""
