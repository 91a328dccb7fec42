"""`cpt_jax.plan` on real TPU topologies: the paper configs compiled by the TPU compiler
(libtpu) for v5p / v5e slices, with per-device memory from XLA, from this CPU machine."""

import json
from pathlib import Path

import pytest

from cpt_jax.config import ConfigError, load_run_config
from cpt_jax.plan import GiB, chip_figures, main, plan, table, topology_devices

pytest.importorskip("libtpu", reason="TPU compilation needs libtpu (requirements-tpu.txt)")

PAPER = Path(__file__).parent.parent / "configs" / "paper"


def _plan(name: str, topology: str, devices: int, programs: list[str],
          overrides: tuple[str, ...] = ()) -> dict:
    config = load_run_config(PAPER / name, overrides, device_count=devices)
    report = plan(config, topology, only=programs)
    print(table(report))  # the figures, in the test log
    return report


@pytest.mark.tpu_compile
@pytest.mark.paper_compile
def test_7b_grpo_fits_a_v5p_8():
    report = _plan("qwen2_5_vl_7b_grpo.yaml", "v5p:2x2x1", 4, ["grpo_update"])
    assert report["devices"] == 4 and report["mesh"] == {"data": 1, "fsdp": 4, "tp": 1}
    assert report["fits"], table(report)
    update = report["programs"]["grpo_update"]
    # 8.29 B fp32 parameters and two bf16 Adam moments, 8 bytes each, sharded four ways (a
    # replicated optimiser state would put the arguments above 40 GiB).
    sharded_state = 8 * 8.29e9 / 4
    assert sharded_state <= update["argument_bytes"] < 1.25 * sharded_state
    assert report["peak_bytes"] <= report["hbm_bytes_per_device"] == 95 * GiB


@pytest.mark.tpu_compile
@pytest.mark.paper_compile
def test_7b_sft_fits_a_v5p_8():
    report = _plan("qwen2_5_vl_7b_sft.yaml", "v5p:2x2x1", 4, ["sft_step"])
    assert report["fits"], table(report)
    assert report["model_flops"]["sft"] > 6 * 8e9 * 64 * 7168  # 6 N T at least


@pytest.mark.tpu_compile
@pytest.mark.paper_compile
@pytest.mark.parametrize("name,program", [("qwen2_5_vl_3b_grpo.yaml", "grpo_update"),
                                          ("qwen2_5_vl_3b_sft.yaml", "sft_step")])
def test_3b_fits_a_v5e_8(name, program):
    """v5e:2x4: two hosts of four 16 GiB chips, everything sharded eight ways."""
    report = _plan(name, "v5e:2x4", 8, [program])
    assert report["hbm_bytes_per_device"] == 16 * GiB and report["hosts"] == 2
    assert report["fits"], table(report)


@pytest.mark.tpu_compile
@pytest.mark.paper_compile
def test_compiles_for_a_two_host_slice():
    """v5p:2x2x2 spans two hosts: the 7B's decode step over the group-expanded KV cache, with
    the weights sharded across both hosts' chips."""
    report = _plan("qwen2_5_vl_7b_grpo.yaml", "v5p:2x2x2", 8, ["decode_step"],
                   ("grpo.micro_batch_rows=8",))
    assert report["hosts"] == 2 and report["devices"] == 8
    assert report["mesh"] == {"data": 1, "fsdp": 8, "tp": 1}
    assert report["fits"], table(report)


@pytest.mark.tpu_compile
def test_cli_json_report_and_what_does_not_fit(capsys):
    """A small model with a batch far too big for a v5e chip: the compiler refuses it, the
    report says by how much, and the search finds the micro-batching that fits."""
    overrides = ["model.preset=small", "model.path=null", "sft.batch_size=512",
                 "sft.micro_batches=1", "data.length_buckets=[4096]", "data.max_pixels=12544",
                 "data.min_patches=64"]
    assert main(["--config", str(PAPER / "qwen2_5_vl_7b_sft.yaml"), "--topology", "v5e:2x2",
                 "--json", *overrides]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= {"topology", "devices", "hbm_bytes_per_device", "programs",
                           "peak_bytes", "fits", "model_flops_per_step"}
    step = report["programs"]["sft_step"]
    assert set(step) >= {"argument_bytes", "temp_bytes", "output_bytes", "peak_bytes",
                         "compile_seconds"}
    assert not report["fits"] and step["error"] and step["peak_bytes"] > 16 * GiB
    assert report["suggestion"] and report["suggestion"].startswith(
        ("sft.micro_batches=", "mesh."))


@pytest.mark.tpu_compile
def test_several_sft_steps_per_call_reuse_one_steps_memory():
    """sft.steps_per_call on the small model, compiled for a v5e slice: a call of 2 or 8
    updates holds one update's temporaries, not one set per update. Beyond their batches
    (each step's input, and a slice of it in the temporaries), 8 steps take no more than 2;
    the loop itself costs a fixed ~10 MB over a single step (a fifth of the sharded state)."""
    overrides = ("model.preset=small", "model.path=null", "sft.batch_size=8",
                 "sft.micro_batches=2", "data.length_buckets=[256]", "data.max_pixels=12544",
                 "data.min_patches=64")
    steps = {per_call: _plan("qwen2_5_vl_3b_sft.yaml", "v5e:2x2", 4, ["sft_step"],
                             (*overrides, f"sft.steps_per_call={per_call}"))
             ["programs"]["sft_step"] for per_call in (1, 2, 8)}
    assert all(step["error"] is None for step in steps.values()), steps
    batch = steps[1]["argument_bytes"] - steps[1]["output_bytes"]  # the state is donated
    assert steps[8]["argument_bytes"] - steps[8]["output_bytes"] <= 8.1 * batch
    assert steps[8]["peak_bytes"] - steps[2]["peak_bytes"] <= 2 * 6 * batch, steps
    assert steps[2]["peak_bytes"] <= 1.25 * steps[1]["peak_bytes"], steps


@pytest.mark.tpu_compile
def test_grpo_programs_of_a_small_model_compile_for_a_v5e():
    """The paper's GRPO config on the small model: its log-prob forward over an update
    micro-batch (the batch the update takes too) and its decode step, compiled in CI's time;
    the paper_compile tests compile every program at 3B / 7B (the update alone ~5 min)."""
    programs = ["logprobs", "decode_step"]
    overrides = ("model.preset=small", "model.path=null", "data.length_buckets=[256]",
                 "data.max_pixels=12544", "data.min_patches=64", "grpo.max_new_tokens=32")
    report = _plan("qwen2_5_vl_3b_grpo.yaml", "v5e:2x2", 4, programs, overrides)
    assert sorted(report["programs"]) == sorted(programs)
    assert report["fits"], table(report)


def test_bad_topology_and_config_are_one_line_errors(capsys):
    assert main(["--config", str(PAPER / "qwen2_5_vl_7b_sft.yaml"),
                 "--topology", "v9z:1x1"]) == 2
    assert "--topology v9z:1x1" in capsys.readouterr().err
    assert main(["--config", str(PAPER / "qwen2_5_vl_7b_sft.yaml"), "--topology",
                 "v5p:2x2x1", "sft.batch_size=6"]) == 2
    assert "sft" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(PAPER.glob("*.yaml")), ids=lambda p: p.stem)
def test_paper_configs_load_with_the_paper_settings(path):
    config = load_run_config(path, device_count=8 if "3b" in path.stem else 4)
    assert [s.task for s in config.stages] == ["scienceqa", "textvqa", "vizwiz", "gqa",
                                               "geometry3k", "pathvqa", "superclevr"]
    assert [s.epochs for s in config.stages] == [1, 1, 1, 1, 10, 1, 3]
    assert config.model.preset == ("qwen2_5_vl_3b" if "3b" in path.stem else "qwen2_5_vl_7b")
    assert config.grpo.group_size == 8 and config.grpo.optim.learning_rate == 1e-6
    assert config.sft.optim.learning_rate == 1e-5 or config.algorithm == "grpo"
    assert config.grpo.kl_coef == (0.0 if "no_kl" in path.stem else 0.01)
    assert config.data.cot == ("no_cot" not in path.stem)


def test_base_chains_resolve_and_refuse_cycles(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nseed: 3\n")
    (tmp_path / "b.yaml").write_text("stages: [{task: syn_choice}]\nseed: 1\nmode: multitask\n")
    config = load_run_config(tmp_path / "a.yaml")
    assert config.seed == 3 and config.mode == "multitask"
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_run_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").unlink()
    with pytest.raises(ConfigError, match=r"b.yaml \(the base of .*a.yaml\) does not exist"):
        load_run_config(tmp_path / "a.yaml")


@pytest.mark.parametrize("topology, devices, hbm", [("v4:2x2x1", 4, 32 * GiB),
                                                    ("v5p:2x2x1", 4, 95 * GiB),
                                                    ("v5e:2x4", 8, 16 * GiB)])
def test_topologies_show_the_devices_jax_shows_on_the_vm(topology, devices, hbm):
    """A v4-8 VM shows four megacore devices of 32 GiB, not eight TensorCores of 16."""
    found = topology_devices(topology)
    assert len(found) == devices
    assert chip_figures(found)[0] == hbm
