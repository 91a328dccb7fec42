"""Rollout sampling of this port against transformers' sampling `generate`, same weights.

    JAX_PLATFORMS=cpu python benchmarks/sampler_vs_transformers.py --preset small

Same model, workload and peer as `forward_vs_transformers.py` (whose helpers this script
imports): our model from `preset(NAME)` with random weights, saved as a Hugging Face folder and
loaded by transformers' `Qwen2_5_VLForConditionalGeneration`, fp32 on both sides, in the
attention implementations of --attn (the ratio is taken against the faster); B left-padded
prompts with one synthetic image each. Every prompt gets a group of n sampled answers of T new
tokens at temperature 1.0, top-p 0.99, no top-k: B * n answers per rollout.

Contenders:
1. ours: `cpt_jax.rl.sampler.make_sampler(group_size=n)`: one jitted program that prefills
   each prompt once (vision tower included), keeps its KV cache once for its n answers (a
   `GroupCache`: every decode step reads a prompt's keys once per group) and decodes with a
   `lax.while_loop`. It is wrapped in one more `jax.jit` (the sampler's own jit is inlined) so
   that lower + compile is timed apart; the program is the same. Host `prepare_inputs` is
   timed apart as well.
2. ours_no_sharing: the same sampler with group_size=1, fed every prompt and its image n times
   in a row: B * n prefills. What one prefill per group saves: ours_no_sharing / ours.
3. transformers: `model.generate(do_sample=True, num_return_sequences=n, temperature=1.0,
   top_p=0.99, top_k=0, max_new_tokens=T, min_new_tokens=T)` under `torch.no_grad()`, with
   no eos (`load_peer`), so every answer has exactly T tokens. `num_return_sequences` expands
   the inputs (images included) before the prefill: B * n prefills, like ours_no_sharing.

Equal token counts: our sampler stops an answer at a stop id, and on random weights any drawn
token could be one. Its stop id here is `vocab_size`, an id it cannot draw (the categorical
draw is over the vocab_size logits), so no answer stops early, as with the peer's missing eos;
the stop test and the while loop's all-done test still run every step, as in a real rollout.
The report records each contender's generated tokens and whether every answer is T tokens long
(and says so should one stop early); times are compared per generated token all the same.

Times are medians of --runs timed runs after --warmup untimed ones, all contenders in
interleaved rounds (the order rotates each round) so that load from elsewhere falls on all of
them alike. ratio = peer time per token / ours, so > 1 means this port is faster. Writes a JSON
report to --out and prints a markdown table. Exits 1 if some group of our answers is all
alike (the sampler would not be sampling).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from forward_vs_transformers import _compile, interleaved, load_peer, make_batch, peer_inputs
from machine import cpu_model, matmul_peak_flops, package_version

from cpt_jax.flops import decode_step_flops
from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL, preset, save_pretrained
from cpt_jax.rl.sampler import Prompts, SamplingConfig, make_sampler

TEMPERATURE, TOP_P = 1.0, 0.99
DEFAULT_OUT = Path(__file__).parent / "results" / "sampler_vs_transformers.json"


def repeat_prompts(data: dict, n: int) -> dict:
    """Every prompt and its image n times in a row (make_batch packs one image per prompt)."""
    rows = np.repeat(np.arange(len(data["input_ids"])), n)
    patches = data["pixel_values"].reshape(len(rows) // n, -1, data["pixel_values"].shape[-1])
    return dict(data, input_ids=data["input_ids"][rows],
                attention_mask=data["attention_mask"][rows],
                pixel_values=patches[rows].reshape(-1, patches.shape[-1]),
                image_grid_thw=data["image_grid_thw"][rows])


def our_sampler(model: Qwen2_5_VL, data: dict, group: int, args,
                new_tokens: int | None = None) -> tuple:
    """The compiled sampler on the prepared prompts, returning (tokens, lengths) as NumPy;
    its compile time and the median host `prepare_inputs` time."""
    cfg = model.config
    config = SamplingConfig(max_new_tokens=new_tokens or args.new_tokens, group_size=group,
                            temperature=TEMPERATURE, top_p=TOP_P)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    sample = make_sampler(model, config, stop_ids=[cfg.text.vocab_size], pad_id=pad)
    states = tuple(nnx.split(model)[1:])

    def prepare() -> Prompts:
        ids, positions, mask, vision, _ = model.prepare_inputs(
            data["input_ids"], attention_mask=data["attention_mask"],
            pixel_values=data["pixel_values"], image_grid_thw=data["image_grid_thw"])
        return jax.block_until_ready(Prompts(ids, positions, mask, vision))

    prepare_s, _, prompts = interleaved({"prepare": prepare}, max(args.runs, 3), 1)["prepare"]
    key = jax.random.key(args.seed)
    compiled, compile_s = _compile(jax.jit(sample), states, prompts, key)

    def run() -> tuple[np.ndarray, np.ndarray]:
        rollout = compiled(states, prompts, key)
        return np.asarray(rollout.tokens), np.asarray(rollout.lengths)

    return run, dict(compile_s=compile_s, prepare_inputs_s=prepare_s)


def peer_sampler(model, cfg, data: dict, args):
    inputs = {k: v for k, v in peer_inputs(model, cfg, data).items() if k != "position_ids"}
    prompt_len = data["input_ids"].shape[1]
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0

    def run() -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=True, num_return_sequences=args.group,
                                 temperature=TEMPERATURE, top_p=TOP_P, top_k=0,
                                 max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 eos_token_id=None, pad_token_id=pad)
        tokens = out[:, prompt_len:].numpy()
        return tokens, np.full(len(tokens), tokens.shape[1])

    return run


def distinct_answers(tokens: np.ndarray, group: int) -> list[int]:
    """How many different answers each prompt's group holds."""
    return [len({a.tobytes() for a in g}) for g in tokens.reshape(-1, group, tokens.shape[1])]


def environment() -> dict:
    """The machine and the package versions the run had."""
    return dict(machine=dict(processor=cpu_model(), cpu_count=os.cpu_count(),
                             torch_threads=torch.get_num_threads(),
                             jax_backend=jax.default_backend(), platform=platform.platform(),
                             python=sys.version.split()[0]),
                versions={p: package_version(p) for p in
                          ("jax", "jaxlib", "flax", "transformers", "torch")})


def sampler_table(report: dict) -> str:
    w, r = report["workload"], report["results"]
    B, n, T = w["batch"], w["group"], w["new_tokens"]
    best = r["peer_best"]
    labels = {"ours": f"ours: {B} prefills, each prompt's cache shared by its {n} answers, "
                      "while_loop decode",
              "ours_no_sharing": f"ours, no sharing: group 1 on the prompts x{n} ({B * n} "
                                 "prefills)"}
    labels.update({a: f"transformers {a}: generate(num_return_sequences={n}) ({B * n} "
                      "prefills)" for a in r["peers"]})
    rows = [f"| sampling {B} prompts x {n} answers x {T} tokens | median (ms) | tokens "
            "| tok/s | ratio peer/ours |", "|---|---|---|---|---|"]
    for name, res in (*((k, r[k]) for k in ("ours", "ours_no_sharing")), *r["peers"].items()):
        ratio = (f"**{r['ratio_peer_over_ours'][name]:.2f}** (vs {best})"
                 if name in r["ratio_peer_over_ours"] else "")
        rows.append(f"| {labels[name]} | {1e3 * res['median_s']:.1f} | {res['tokens']} | "
                    f"{res['tokens_per_s']:.0f} | {ratio} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8, help="prompts (8 x 8 = 64 sequences)")
    parser.add_argument("--group", type=int, default=8, help="answers per prompt")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224, help="square image side, pixels")
    parser.add_argument("--text-tokens", type=int, default=64,
                        help="text tokens of the longest prompt (each next one has 6 fewer)")
    parser.add_argument("--attn", nargs="+", default=["eager", "sdpa"],
                        choices=["eager", "sdpa"], help="transformers attention implementations")
    parser.add_argument("--scan-layers", action="store_true",
                        help="scan the layers (the default for TPU runs) instead of unrolling")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if min(args.runs, args.batch, args.group) < 1 or args.new_tokens < 2 or args.warmup < 0:
        parser.error("--runs, --batch and --group must be >= 1, --new-tokens >= 2, --warmup >= 0")

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    peak = matmul_peak_flops()
    print(f"matmul peak: {peak['peak'] / 1e9:.0f} GFLOP/s", flush=True)
    cfg = preset(args.preset)
    model = Qwen2_5_VL(cfg, dtype=jnp.float32, param_dtype=jnp.float32,
                       max_frame_patches=(args.image_size // cfg.vision.patch_size) ** 2,
                       scan_layers=args.scan_layers, rngs=nnx.Rngs(args.seed))
    parameters = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    data = make_batch(cfg, batch=args.batch, image_size=args.image_size,
                      text_tokens=args.text_tokens, seed=args.seed)
    B, n, T = args.batch, args.group, args.new_tokens
    workload = dict(batch=B, group=n, new_tokens=T, answers=B * n, temperature=TEMPERATURE,
                    top_p=TOP_P, top_k=0, image_size=args.image_size, grid_thw=data["grid"],
                    image_tokens_per_prompt=data["image_tokens"], prompt_lengths=data["lengths"],
                    padded_length=int(data["input_ids"].shape[1]), runs=args.runs,
                    warmup=args.warmup, dtype="float32", scan_layers=args.scan_layers,
                    seed=args.seed)
    print(f"preset {args.preset}: {parameters:,} parameters; {B} prompts {data['lengths']} "
          f"tokens left-padded to {data['input_ids'].shape[1]}, {n} answers each, {T} new "
          f"tokens", flush=True)

    contenders, info = {}, {}
    for name, prompts, group in (("ours", data, n),
                                 ("ours_no_sharing", repeat_prompts(data, n), 1)):
        contenders[name], info[name] = our_sampler(model, prompts, group, args)
        print(f"{name} compiled in {info[name]['compile_s']:.1f} s", flush=True)
    prefill_only, _ = our_sampler(model, data, n, args, new_tokens=1)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        peer_models = {attn: load_peer(Path(tmp), attn) for attn in args.attn}
    contenders.update({a: peer_sampler(m, cfg, data, args) for a, m in peer_models.items()})

    timed = interleaved({**contenders, "ours_prefill": prefill_only}, args.runs, args.warmup)
    prefill_s = timed.pop("ours_prefill")[0]
    results, checks = {}, {}
    for name, (median_s, runs_s, (tokens, lengths)) in timed.items():
        if tokens.shape != (B * n, T):
            raise RuntimeError(f"{name} gave tokens of shape {tokens.shape}, expected {(B * n, T)}")
        generated = int(lengths.sum())
        results[name] = dict(info.get(name, {}), median_s=median_s, runs_s=runs_s,
                             tokens=generated, tokens_per_s=generated / median_s)
        checks[name] = dict(mean_length=float(lengths.mean()), all_full_length=bool(
            (lengths == T).all()), distinct_answers_per_group=distinct_answers(tokens, n))
        print(f"{name}: {median_s:.4f} s, {generated} tokens, distinct answers per group "
              f"{checks[name]['distinct_answers_per_group']}", flush=True)

    # One decode step: the rollout less its prefill and first token, per remaining token.
    step_s = (results["ours"]["median_s"] - prefill_s) / (T - 1)
    step_flops = np.mean([decode_step_flops(cfg.text, [length + i for length in data["lengths"]
                                                       for _ in range(n)])
                          for i in range(1, T)])
    decode = dict(prefill_and_first_token_s=prefill_s, step_s=step_s,
                  model_flops_per_step=float(step_flops),
                  model_flops_per_s=float(step_flops / step_s),
                  fraction_of_matmul_peak=float(step_flops / step_s / peak["peak"]))
    peers = {a: results.pop(a) for a in peer_models}
    best = min(peers, key=lambda a: peers[a]["median_s"] / peers[a]["tokens"])
    per_token = {k: v["median_s"] / v["tokens"] for k, v in (*results.items(), *peers.items())}
    report = dict(
        benchmark="sampler_vs_transformers",
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **environment(), matmul_peak_flops_per_s=peak,
        preset=args.preset, parameters=int(parameters), workload=workload,
        results=dict(results, peers=peers, peer_best=best, decode=decode,
                     ratio_peer_over_ours={k: per_token[best] / per_token[k] for k in results},
                     sharing_speedup=per_token["ours_no_sharing"] / per_token["ours"]),
        checks=checks,
        target="sampled tokens/s at least 2x transformers' generate (stretch 4x)",
        target_met=per_token[best] / per_token["ours"] >= 2.0,
        total_wall_s=time.perf_counter() - t_start,
    )
    print()
    print(sampler_table(report))
    print(f"\none prefill per group: {report['results']['sharing_speedup']:.2f}x faster than "
          f"{B * n} prefills; compile: ours {info['ours']['compile_s']:.1f} s, no sharing "
          f"{info['ours_no_sharing']['compile_s']:.1f} s; host prepare_inputs (not in the "
          f"times above) {1e3 * info['ours']['prepare_inputs_s']:.1f} ms, no sharing "
          f"{1e3 * info['ours_no_sharing']['prepare_inputs_s']:.1f} ms")
    rollout_s = results["ours"]["median_s"]
    print(f"decode step ({B * n} rows): {1e3 * step_s:.1f} ms (rollout {1e3 * rollout_s:.0f} "
          f"ms less prefill + first token {1e3 * prefill_s:.0f} ms, over "
          f"{T - 1} steps), {step_flops / 1e9:.2f} model GFLOP per step: "
          f"{step_flops / step_s / 1e9:.1f} GFLOP/s, {decode['fraction_of_matmul_peak']:.1%} of "
          f"the {peak['peak'] / 1e9:.0f} GFLOP/s matmul peak")
    if not all(c["all_full_length"] for c in checks.values()):
        print("note: some answers stopped early; ratios are per generated token")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['total_wall_s']:.0f} s in all)")

    alike = [name for name in results if min(checks[name]["distinct_answers_per_group"]) < 2]
    if alike and n > 1:
        raise SystemExit(f"FAIL: {', '.join(alike)}: some group's answers are all alike")
    return report


if __name__ == "__main__":
    main()
