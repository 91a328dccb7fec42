#!/usr/bin/env bash
# Stop the training on every worker (the last rolling checkpoint stays: --resume continues),
# and with --delete remove the TPU VM so that it stops costing.
#   tpu_scripts/stop.sh --name cpt-jax [--delete]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$here/lib.sh"
usage() { echo "usage: $0 [--delete]"; usage_common; }
parse_common "$@"
delete=0
for arg in "${EXTRA[@]+"${EXTRA[@]}"}"; do
  case "$arg" in
    --delete) delete=1 ;;
    *) echo "unknown argument $arg" >&2; usage >&2; exit 2 ;;
  esac
done
on_all_workers "pkill -INT -f 'python -m cpt_jax.train' || true"
if ((delete)); then
  tpu_vm delete "$NAME" --quiet
fi
