"""A stage's model as a Hugging Face folder that transformers loads:

    python -m cpt_jax.export <output_dir>/checkpoints/stages/<stage> <hf_dir>

The run's `config.yaml` (two folders above `checkpoints/`) says which model it was; the
folder gets config.json, safetensors and the run's tokenizer.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from flax import nnx

from cpt_jax.checkpoint import CheckpointError, Checkpoints, abstract
from cpt_jax.config import ConfigError, load_run_config
from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL, save_pretrained
from cpt_jax.train import TOKENIZER_DIR, build_model


def export_stage(checkpoint: Path, destination: Path) -> Qwen2_5_VL:
    """Restores `<output_dir>/checkpoints/stages/<stage>` and writes it to `destination`."""
    checkpoint = checkpoint.resolve()
    if not checkpoint.name.isdigit() or checkpoint.parent.name != "stages":
        raise CheckpointError(f"{checkpoint}: expected <output_dir>/checkpoints/stages/<stage>")
    output_dir = checkpoint.parents[2]
    config = load_run_config(output_dir / "config.yaml")
    model = build_model(config, abstract_only=True)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    checkpoints = Checkpoints(output_dir)
    try:
        restored, _ = checkpoints.restore_stage(int(checkpoint.name), abstract(params))
    finally:
        checkpoints.close()
    model = nnx.merge(graphdef, restored, rest)
    tokenizer = output_dir / TOKENIZER_DIR
    assets = config.model.tokenizer or config.model.path or (
        tokenizer if tokenizer.exists() else None)
    save_pretrained(model, destination, assets_from=assets)
    return model


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpt_jax.export",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="<output_dir>/checkpoints/stages/<stage>")
    parser.add_argument("destination", type=Path, help="the Hugging Face folder to write")
    args = parser.parse_args(argv)
    try:
        export_stage(args.checkpoint, args.destination)
    except (CheckpointError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.destination}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
