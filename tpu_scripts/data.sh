#!/usr/bin/env bash
# Put the built data (python -m cpt_jax.data.build output) and the model on every worker:
# copied from Cloud Storage to local disk (fast reads), or mounted with gcsfuse (--mount).
#   tpu_scripts/data.sh --name cpt-jax --data gs://bucket/tfds --model gs://bucket/Qwen2.5-VL-7B-Instruct
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$here/lib.sh"
usage() { echo "usage: $0 --data gs://... [--model gs://...] [--mount]"; usage_common; }
parse_common "$@"
data="" model="" mount=0
set -- "${EXTRA[@]+"${EXTRA[@]}"}"
while (($#)); do
  case "$1" in
    --data) data="$2"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    --mount) mount=1; shift ;;
    *) echo "unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
if [[ -z "$data" ]]; then echo "--data is required" >&2; exit 2; fi
if ((mount)); then
  bucket="${data#gs://}"; bucket="${bucket%%/*}"
  on_all_workers "set -e; mkdir -p ~/gcs && (mountpoint -q ~/gcs || gcsfuse --implicit-dirs $bucket ~/gcs)"
  echo "data under ~/gcs/${data#gs://"$bucket"/}: set data.data_dir to it"
else
  on_all_workers "set -e; mkdir -p ~/data && gcloud storage cp -r $data ~/data/"
  echo "data under ~/data/$(basename "$data"): set data.data_dir to it"
fi
if [[ -n "$model" ]]; then
  on_all_workers "set -e; mkdir -p ~/models && gcloud storage cp -r $model ~/models/"
  echo "model under ~/models/$(basename "$model"): set model.path to it"
fi
