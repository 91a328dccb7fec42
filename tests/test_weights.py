"""Hugging Face checkpoints in and out: round trip through transformers, both key layouts,
sharded folders, and errors that name the offending key."""

from __future__ import annotations

import json
import shutil
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from qwen_reference import VARIANTS, hf_logits, hf_model, multimodal_batch
from safetensors import safe_open
from safetensors.numpy import save_file

from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL, from_pretrained, preset, save_pretrained
from cpt_jax.models.qwen2_5_vl.weights import INDEX_FILE


def _read_all(folder) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _write_sharded(tensors: dict[str, np.ndarray], folder, shards: int) -> None:
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untied transformers checkpoint (original key layout) and its model."""
    variant = VARIANTS[1]
    reference = hf_model(variant, seed=3)
    path = tmp_path_factory.mktemp("hf")
    reference.save_pretrained(path)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 32}')
    (path / "chat_template.jinja").write_text("{{ messages }}")
    return reference, path


def test_round_trip_through_transformers(pair, tmp_path):
    """transformers -> its save -> our load -> our save (sharded) -> transformers load."""
    variant, reference, model = pair
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    save_pretrained(model, ours, max_shard_bytes=64 * 1024)
    assert (ours / INDEX_FILE).exists(), "small shards should give an index file"
    reloaded = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        ours, attn_implementation="eager").eval()
    batch = multimodal_batch()
    before, after = hf_logits(reference, batch), hf_logits(reloaded, batch)
    diff = float(np.abs(before - after).max())
    print(f"{variant.name}: round-trip max |logit diff| = {diff:.1e}")
    assert diff == 0.0
    reference.save_pretrained(theirs)
    original, written = _read_all(theirs), _read_all(ours)
    assert written.keys() == original.keys()
    for key in original:
        np.testing.assert_array_equal(written[key], original[key], err_msg=key)


def test_transformers5_layout_sharded_with_index(checkpoint, tmp_path):
    reference, path = checkpoint
    renamed = {}
    for key, value in _read_all(path).items():
        if key.startswith("visual."):
            key = "model." + key
        elif key.startswith("model."):
            key = "model.language_model." + key[len("model."):]
        renamed[key] = value
    _write_sharded(renamed, tmp_path, shards=3)
    shutil.copy(path / "config.json", tmp_path / "config.json")
    batch = multimodal_batch()
    got = np.asarray(from_pretrained(tmp_path)(batch.input_ids, **batch.ours()))
    expected = np.asarray(from_pretrained(path)(batch.input_ids, **batch.ours()))
    np.testing.assert_array_equal(got, expected)


def test_tokenizer_and_processor_files_are_copied(checkpoint, tmp_path):
    _, path = checkpoint
    save_pretrained(from_pretrained(path), tmp_path)
    assert (tmp_path / "tokenizer_config.json").read_text() == '{"model_max_length": 32}'
    assert (tmp_path / "chat_template.jinja").exists()
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / INDEX_FILE).exists()


def test_bfloat16_storage(checkpoint, tmp_path):
    reference, path = checkpoint
    model = from_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    dtypes = {x.dtype for x in jax.tree.leaves(model)}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    save_pretrained(model, tmp_path)
    tensors = _read_all(tmp_path)
    assert {str(t.dtype) for t in tensors.values()} == {"bfloat16"}
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    reloaded = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path)
    assert next(reloaded.parameters()).dtype.is_floating_point


def _corrupt(path, tmp_path, edit) -> None:
    tensors = _read_all(path)
    config = json.loads((path / "config.json").read_text())
    edit(tensors, config)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(config))


def test_missing_key_is_named(checkpoint, tmp_path):
    _, path = checkpoint
    _corrupt(path, tmp_path, lambda t, c: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\.self_attn\.k_proj\.bias"):
        from_pretrained(tmp_path)


def test_unexpected_key_is_named(checkpoint, tmp_path):
    _, path = checkpoint
    _corrupt(path, tmp_path, lambda t, c: t.update(
        {"model.layers.0.self_attn.rotary.inv_freq": np.zeros(4, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected.*model\.layers\.0\.self_attn\.rotary"):
        from_pretrained(tmp_path)


def test_checkpoint_of_another_shape_is_named(checkpoint, tmp_path):
    _, path = checkpoint

    def other_shape(tensors, config):
        config["text_config"]["intermediate_size"] += 8

    _corrupt(path, tmp_path, other_shape)
    with pytest.raises(ValueError,
                       match=r"model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight has shape"):
        from_pretrained(tmp_path)


def test_unknown_config_field_is_named(checkpoint, tmp_path):
    _, path = checkpoint
    _corrupt(path, tmp_path, lambda t, c: c.update({"num_hiden_layers": 3}))
    with pytest.raises(ValueError, match="num_hiden_layers"):
        from_pretrained(tmp_path)


def test_loading_never_holds_a_second_copy_of_the_model(tmp_path):
    """Host allocations while loading the `small` preset, beyond what the loaded model keeps,
    stay far below the model's size: tensors go one at a time into the buffer of their
    (stacked) parameter. (On the CPU backend a parameter may keep its NumPy buffer as its
    storage, so what stays allocated at the end is the model, not overhead.)"""
    model = Qwen2_5_VL(preset("small"), rngs=nnx.Rngs(0))
    sizes = [x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    save_pretrained(model, tmp_path)
    del model
    tracemalloc.start()
    try:
        loaded = from_pretrained(tmp_path)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del loaded
    overhead = peak - kept
    print(f"model {sum(sizes) / 1e6:.1f} MB, largest parameter {max(sizes) / 1e6:.1f} MB, "
          f"peak host allocation while loading {peak / 1e6:.1f} MB, of which kept by the "
          f"model {kept / 1e6:.1f} MB")
    assert overhead < 0.5 * sum(sizes)
