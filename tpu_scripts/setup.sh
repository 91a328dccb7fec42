#!/usr/bin/env bash
# Install the project on every worker: clone (or update) the repository, a Python 3.11
# virtual environment, the package with the TPU extra (libtpu).
#   tpu_scripts/setup.sh --name cpt-jax --repo https://github.com/you/cpt_jax.git [--ref main]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$here/lib.sh"
usage() { echo "usage: $0 --repo URL [--ref REF]"; usage_common; }
parse_common "$@"
ref=main repo="${CPT_JAX_REPO:-}"
set -- "${EXTRA[@]+"${EXTRA[@]}"}"
while (($#)); do
  case "$1" in
    --repo) repo="$2"; shift 2 ;;
    --ref) ref="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
if [[ -z "$repo" ]]; then echo "--repo (or \$CPT_JAX_REPO) is required" >&2; exit 2; fi
steps=(
  "sudo apt-get -qq update"
  "sudo apt-get -qq install -y python3.11 python3.11-venv"
  "(test -d ~/cpt_jax/.git || git clone -q $repo ~/cpt_jax)"
  "git -C ~/cpt_jax fetch -q origin"
  "git -C ~/cpt_jax checkout -q $ref"
  "(git -C ~/cpt_jax pull -q --ff-only || true)"
  "cd ~/cpt_jax"
  "python3.11 -m venv .venv"
  ". .venv/bin/activate"
  "pip install -q -e . -r requirements-tpu.txt"
  "python -c \"import jax; print(jax.process_index(), jax.device_count())\""
)
joined="$(printf ' && %s' "${steps[@]}")"
on_all_workers "${joined# && }"
