#!/usr/bin/env bash
# Create a TPU VM (one host) or pod slice (several), spot or on demand.
#   tpu_scripts/create.sh --name cpt-jax --zone us-east5-a --accelerator v5p-8 [--spot]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$here/lib.sh"
usage() { echo "usage: $0 [--spot]"; usage_common; }
parse_common "$@"
spot=()
for arg in "${EXTRA[@]+"${EXTRA[@]}"}"; do
  case "$arg" in
    --spot) spot=(--spot) ;;
    *) echo "unknown argument $arg" >&2; usage >&2; exit 2 ;;
  esac
done
version="$(runtime_version)"
tpu_vm create "$NAME" --accelerator-type "$ACCELERATOR" --version "$version" \
  "${spot[@]+"${spot[@]}"}"
