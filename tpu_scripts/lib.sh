# Shared by the tpu_scripts: flags, defaults and a `run` that prints instead of running under
# --dry-run. Sourced, not executed.
# shellcheck shell=bash

NAME="${TPU_NAME:-cpt-jax}"
ZONE="${TPU_ZONE:-us-east5-a}"
PROJECT="${TPU_PROJECT:-}"
ACCELERATOR="${TPU_ACCELERATOR:-v5p-8}"
VERSION="${TPU_VERSION:-}"
DRY_RUN=0
EXTRA=()

usage_common() {
  cat <<'USAGE'
common flags (defaults from the environment):
  --name N          TPU VM name ($TPU_NAME, default cpt-jax)
  --zone Z          zone ($TPU_ZONE, default us-east5-a)
  --project P       GCP project ($TPU_PROJECT, default: gcloud's)
  --accelerator A   v5p-8, v4-8, v5litepod-8, v5p-16, ... ($TPU_ACCELERATOR, default v5p-8)
  --version V       TPU VM software version ($TPU_VERSION, default: by accelerator)
  --dry-run         print the commands instead of running them
USAGE
}

parse_common() {
  while (($#)); do
    case "$1" in
      --name) NAME="$2"; shift 2 ;;
      --zone) ZONE="$2"; shift 2 ;;
      --project) PROJECT="$2"; shift 2 ;;
      --accelerator) ACCELERATOR="$2"; shift 2 ;;
      --version) VERSION="$2"; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h|--help) usage; exit 0 ;;
      *) EXTRA+=("$1"); shift ;;
    esac
  done
}

# The TPU VM software version that matches the accelerator generation.
runtime_version() {
  if [[ -n "$VERSION" ]]; then echo "$VERSION"; return; fi
  case "$ACCELERATOR" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) echo "unknown accelerator $ACCELERATOR: pass --version" >&2; return 1 ;;
  esac
}

# gcloud's TPU VM command with the project and zone flags.
tpu_vm() {
  local flags=(--zone "$ZONE")
  if [[ -n "$PROJECT" ]]; then flags+=(--project "$PROJECT"); fi
  run gcloud compute tpus tpu-vm "$@" "${flags[@]}"
}

# A command on every worker of the slice (one host or many).
on_all_workers() {
  tpu_vm ssh "$NAME" --worker=all --command "$1"
}

run() {
  if ((DRY_RUN)); then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}
