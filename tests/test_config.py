"""Qwen2.5-VL configuration: presets, Hugging Face `config.json` in both layouts, and errors.

Checked against transformers itself: its `Qwen2_5_VLConfig` must load what `to_hf_dict`
writes, and `from_hf_dict` must read what transformers writes (the nested layout of
transformers 5) as well as the original flat `config.json` of the released checkpoints.
"""

from __future__ import annotations

import copy
import json

import pytest
import transformers

from cpt_jax.models.qwen2_5_vl import Qwen2_5_VLConfig, preset
from cpt_jax.models.qwen2_5_vl.config import PRESET_DIR

# Qwen/Qwen2.5-VL-7B-Instruct config.json, as released (the original flat layout).
QWEN2_5_VL_7B_CONFIG_JSON = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
}

PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
HF_PRESETS = ["tiny", "small", "qwen2_5_vl_3b", "qwen2_5_vl_7b"]


def _flat_7b() -> dict:
    return copy.deepcopy(QWEN2_5_VL_7B_CONFIG_JSON)


def _nested(hf_config: transformers.Qwen2_5_VLConfig, form: str, tmp_path) -> dict:
    """What transformers writes for `hf_config`: to_dict, to_diff_dict or save_pretrained."""
    if form == "to_dict":
        return hf_config.to_dict()
    if form == "to_diff_dict":
        return hf_config.to_diff_dict()
    hf_config.save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


# ----------------------------------------------------------------------------- presets
def test_presets_found():
    assert set(HF_PRESETS) <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads(name):
    config = preset(name)
    assert isinstance(config, Qwen2_5_VLConfig)
    assert 2 * sum(config.text.mrope_section) == config.text.head_dim
    assert Qwen2_5_VLConfig.from_dict(config.to_dict()) == config


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="unknown model preset 'nope'") as info:
        preset("nope")
    for name in PRESETS:
        assert name in str(info.value)


# ----------------------------------------------------------------------------- from_hf_dict
def test_flat_7b_config_json_is_the_7b_preset():
    assert Qwen2_5_VLConfig.from_hf_dict(_flat_7b()) == preset("qwen2_5_vl_7b")


def test_flat_7b_loads_in_transformers_with_the_preset_sizes():
    """The literal above is a real checkpoint config: transformers reads it as we do."""
    _assert_same_as_hf(preset("qwen2_5_vl_7b"), transformers.Qwen2_5_VLConfig(**_flat_7b()))


@pytest.mark.parametrize("form", ["to_dict", "to_diff_dict", "save_pretrained"])
def test_nested_layout_of_the_7b_checkpoint(form, tmp_path):
    hf_config = transformers.Qwen2_5_VLConfig(**_flat_7b())
    nested = _nested(hf_config, form, tmp_path)
    assert "text_config" in nested and "hidden_size" not in nested  # really the nested layout
    assert Qwen2_5_VLConfig.from_hf_dict(nested) == preset("qwen2_5_vl_7b")


@pytest.mark.parametrize("name", ["tiny", "small", "qwen2_5_vl_3b"])
@pytest.mark.parametrize("form", ["to_diff_dict", "save_pretrained"])
def test_nested_layout_of_presets(name, form, tmp_path):
    config = preset(name)
    nested = _nested(transformers.Qwen2_5_VLConfig(**config.to_hf_dict()), form, tmp_path)
    assert Qwen2_5_VLConfig.from_hf_dict(nested) == config


def test_nested_layout_tie_inside_text_config():
    """Configs saved by transformers 4.5x keep tie_word_embeddings inside text_config."""
    nested = transformers.Qwen2_5_VLConfig(**_flat_7b()).to_diff_dict()
    nested.pop("tie_word_embeddings", None)
    nested["text_config"]["tie_word_embeddings"] = True
    assert Qwen2_5_VLConfig.from_hf_dict(nested).tie_word_embeddings


# ----------------------------------------------------------------------------- to_hf_dict
def _assert_same_as_hf(config: Qwen2_5_VLConfig, hf: transformers.Qwen2_5_VLConfig) -> None:
    t, v = config.text, config.vision
    ht, hv = hf.text_config, hf.vision_config
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "max_position_embeddings",
    ):
        assert getattr(ht, field) == getattr(t, field), field
    assert ht.hidden_act == "silu" and not ht.use_sliding_window
    assert ht.rope_parameters["rope_theta"] == t.rope_theta
    assert tuple(ht.rope_parameters["mrope_section"]) == t.mrope_section
    for field in (
        "depth",
        "hidden_size",
        "intermediate_size",
        "num_heads",
        "out_hidden_size",
        "in_channels",
        "patch_size",
        "temporal_patch_size",
        "spatial_merge_size",
        "window_size",
        "tokens_per_second",
    ):
        assert getattr(hv, field) == getattr(v, field), field
    assert tuple(hv.fullatt_block_indexes) == v.fullatt_block_indexes
    assert hv.rope_parameters["rope_theta"] == v.rope_theta
    assert hf.tie_word_embeddings == config.tie_word_embeddings
    for field in (
        "image_token_id",
        "video_token_id",
        "vision_start_token_id",
        "vision_end_token_id",
    ):
        assert getattr(hf, field) == getattr(config, field), field
    for field in ("bos_token_id", "eos_token_id", "pad_token_id"):  # text_config in transformers 5
        assert getattr(ht, field) == getattr(config, field), field


@pytest.mark.parametrize("name", HF_PRESETS)
def test_to_hf_dict_loads_in_transformers(name):
    config = preset(name)
    _assert_same_as_hf(config, transformers.Qwen2_5_VLConfig(**config.to_hf_dict()))


@pytest.mark.parametrize("name", HF_PRESETS)
def test_hf_dict_round_trip(name):
    config = preset(name)
    hf_dict = config.to_hf_dict()
    assert json.loads(json.dumps(hf_dict)) == hf_dict  # plain JSON
    assert Qwen2_5_VLConfig.from_hf_dict(hf_dict) == config


def test_to_hf_dict_tie_follows_the_preset():
    assert preset("qwen2_5_vl_3b").to_hf_dict()["tie_word_embeddings"] is True
    assert preset("qwen2_5_vl_7b").to_hf_dict()["tie_word_embeddings"] is False


# ----------------------------------------------------------------------------- errors
def test_top_level_typo_is_named():
    hf = _flat_7b()
    hf["hiden_size"] = hf.pop("hidden_size")
    with pytest.raises(ValueError, match="hiden_size"):
        Qwen2_5_VLConfig.from_hf_dict(hf)


def test_nested_text_config_typo_is_named():
    nested = transformers.Qwen2_5_VLConfig(**_flat_7b()).to_diff_dict()
    nested["text_config"]["num_hiden_layers"] = 3
    with pytest.raises(ValueError, match="text_config.*num_hiden_layers"):
        Qwen2_5_VLConfig.from_hf_dict(nested)


def test_vision_config_typo_is_named():
    hf = _flat_7b()
    hf["vision_config"]["window_sise"] = 112
    with pytest.raises(ValueError, match="vision_config.*window_sise"):
        Qwen2_5_VLConfig.from_hf_dict(hf)


def test_rope_scaling_typo_is_named():
    hf = _flat_7b()
    hf["rope_scaling"]["mrope_sections"] = hf["rope_scaling"].pop("mrope_section")
    with pytest.raises(ValueError, match="rope_scaling.*mrope_sections"):
        Qwen2_5_VLConfig.from_hf_dict(hf)


def test_preset_style_typo_is_named():
    with pytest.raises(ValueError, match=r"text.*\['layers'\]"):
        Qwen2_5_VLConfig.from_dict({"text": {"layers": 2}})
    with pytest.raises(ValueError, match="tie_embeddings"):
        Qwen2_5_VLConfig.from_dict({"tie_embeddings": True})
    with pytest.raises(ValueError, match="vision.*depht"):
        Qwen2_5_VLConfig.from_dict({"vision": {"depht": 2}})


def test_sliding_window_is_rejected():
    hf = _flat_7b()
    hf["use_sliding_window"] = True
    with pytest.raises(ValueError, match="use_sliding_window"):
        Qwen2_5_VLConfig.from_hf_dict(hf)


def test_other_rope_type_is_rejected():
    hf = _flat_7b()
    hf["rope_scaling"] = {"type": "yarn", "factor": 4.0}
    with pytest.raises(ValueError, match="yarn"):
        Qwen2_5_VLConfig.from_hf_dict(hf)


def test_other_model_type_is_rejected():
    hf = _flat_7b()
    hf["model_type"] = "qwen2_vl"
    with pytest.raises(ValueError, match="qwen2_vl"):
        Qwen2_5_VLConfig.from_hf_dict(hf)


def test_mrope_section_must_sum_to_half_head_dim():
    hf = _flat_7b()
    hf["rope_scaling"]["mrope_section"] = [16, 24, 32]
    with pytest.raises(ValueError, match="mrope_section"):
        Qwen2_5_VLConfig.from_hf_dict(hf)
    with pytest.raises(ValueError, match="mrope_section"):
        Qwen2_5_VLConfig.from_dict({"text": {"mrope_section": [8, 12, 12]}})  # 7B head_dim 128
