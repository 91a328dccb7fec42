"""A stage's model as a Hugging Face folder that transformers loads:

    python -m cpt_jax.export <output_dir>/checkpoints/stages/<stage> <hf_dir>

The run's `config.yaml` (two folders above `checkpoints/`) says which model it was; the
folder gets config.json, safetensors and the run's tokenizer. `output_dir` may be a `gs://`
URL.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from flax import nnx

from cpt_jax.checkpoint import CheckpointError, Checkpoints, abstract
from cpt_jax.config import ConfigError, load_run_config
from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL, save_pretrained
from cpt_jax.run_dir import RunDir, as_path
from cpt_jax.train import TOKENIZER_DIR, build_model


def export_stage(checkpoint: os.PathLike | str, destination: Path) -> Qwen2_5_VL:
    """Restores `<output_dir>/checkpoints/stages/<stage>` (a folder or a `gs://` URL) and
    writes it to `destination`."""
    checkpoint = as_path(checkpoint)
    if not checkpoint.name.isdigit() or checkpoint.parent.name != "stages":
        raise CheckpointError(f"{checkpoint}: expected <output_dir>/checkpoints/stages/<stage>")
    output_dir = str(checkpoint.parent.parent.parent)
    with tempfile.TemporaryDirectory(prefix="cpt_jax_export_") as staging:
        files = RunDir(output_dir, staging)  # a URL's config and tokenizer, downloaded
        files.pull()
        config = load_run_config(files.local / "config.yaml")
        model = build_model(config, abstract_only=True)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        checkpoints = Checkpoints(output_dir)
        try:
            restored, _ = checkpoints.restore_stage(int(checkpoint.name), abstract(params))
        finally:
            checkpoints.close()
        model = nnx.merge(graphdef, restored, rest)
        tokenizer = files.local / TOKENIZER_DIR
        assets = config.model.tokenizer or config.model.path or (
            tokenizer if tokenizer.exists() else None)
        save_pretrained(model, destination, assets_from=assets)
    return model


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpt_jax.export",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="<output_dir>/checkpoints/stages/<stage>")
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
