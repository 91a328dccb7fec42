"""Forward pass and greedy decoding of this port against transformers' Qwen2.5-VL, same weights.

    JAX_PLATFORMS=cpu python benchmarks/forward_vs_transformers.py --preset small

Builds our model from `preset(NAME)` with random weights, saves it as a Hugging Face folder and
loads that folder with transformers' `Qwen2_5_VLForConditionalGeneration` (the peer), fp32 on
both sides, in both of transformers' CPU attention implementations (`eager`, the parity
reference, and `sdpa`, its fast default); ratios are taken against the faster of the two.

Workload: a batch of B prompts, each `<text> <vision_start> <image>*n <vision_end> <text>`
with one synthetic image (random patches), left-padded to different lengths.

1. forward: ours is the jitted `model.forward` on the arrays of `model.prepare_inputs` (host
   preparation timed separately); the peer is `model(**inputs, position_ids=...)` under
   `torch.no_grad()`, with transformers' own `get_rope_index` positions computed beforehand.
   Logits must agree on the real tokens (max |diff| <= 1e-3 against eager, else exit 1).
2. prefill: ours is the jitted prefill into a KV cache of prompt + T slots plus the argmax of
   the last logits; the peer is `model.generate(max_new_tokens=1)`.
3. greedy decode: prefill + T new tokens. Ours: the jitted prefill, then T-1 jitted decode
   steps from a Python loop ("loop"), and the same inside one jit with `lax.fori_loop`
   ("fused"); the better of the two is reported. The peer is `model.generate(do_sample=False,
   max_new_tokens=T)` with no eos, so no row stops early. The number of agreeing greedy tokens
   is reported (random weights can give near-ties; exit 1 below 90%).
   One decode step is derived as (decode - prefill) / (T - 1), for both sides.

Times are medians of --runs timed runs after --warmup untimed ones; the contenders of one
measurement run in interleaved rounds, so that load from elsewhere falls on all of them alike.
ratio = peer / ours, so > 1 means this port is faster. Compile time (lower + compile) and the
host-side `prepare_inputs` are reported separately. Writes a JSON report to --out and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx
from machine import cpu_model, package_version

from cpt_jax.models.qwen2_5_vl import KVCache, Qwen2_5_VL, preset, save_pretrained

LOGIT_TOLERANCE = 1e-3
MIN_TOKEN_AGREEMENT = 0.9
DEFAULT_OUT = Path(__file__).parent / "results" / "forward_vs_transformers.json"


# ----------------------------------------------------------------------------- workload
def make_batch(cfg, *, batch: int, image_size: int, text_tokens: int, seed: int) -> dict:
    """Left-padded prompts of different lengths, one random image each."""
    patch, merge = cfg.vision.patch_size, cfg.vision.spatial_merge_size
    if image_size % (patch * merge):
        raise ValueError(f"--image-size must be a multiple of {patch * merge}")
    side = image_size // patch
    grid = (1, side, side)
    n_image = side * side // cfg.vision.merge_unit
    special = {cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id, cfg.image_token_id,
               cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}
    allowed = np.setdiff1d(np.arange(cfg.text.vocab_size), [i for i in special if i is not None])
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(batch):
        n_text = max(2, text_tokens - 6 * i)  # different lengths -> different left padding
        before = int(rng.integers(1, n_text))
        text = rng.choice(allowed, n_text).tolist()
        rows.append(text[:before] + [cfg.vision_start_token_id] + [cfg.image_token_id] * n_image
                    + [cfg.vision_end_token_id] + text[before:])
    width = max(map(len, rows))
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    ids = np.full((batch, width), pad, np.int64)
    mask = np.zeros((batch, width), np.int64)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    pixel_values = rng.standard_normal((batch * side * side, cfg.vision.patch_dim))
    pixel_values = pixel_values.astype(np.float32)
    grid_thw = np.array([grid] * batch, np.int64)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values,
                image_grid_thw=grid_thw, lengths=[len(r) for r in rows], grid=list(grid),
                image_tokens=n_image)


# ----------------------------------------------------------------------------- timing
def interleaved(contenders: dict, runs: int, warmup: int) -> dict:
    """Times every zero-argument callable `runs` times after `warmup` untimed calls, in
    interleaved rounds (the order rotates each round), so that load from elsewhere on the
    machine falls on all contenders alike. Returns {name: (median_s, times_s, last_output)}."""
    names = list(contenders)
    times: dict = {n: [] for n in names}
    outputs: dict = {}
    for r in range(warmup + runs):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            outputs[name] = contenders[name]()
            elapsed = time.perf_counter() - start
            if r >= warmup:
                times[name].append(elapsed)
    return {n: (statistics.median(times[n]), times[n], outputs[n]) for n in names}


def _compile(jitted, *args):
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


# ----------------------------------------------------------------------------- ours
def our_functions(model: Qwen2_5_VL, batch: int, max_len: int, new_tokens: int):
    """jax.jit over the split state (nnx.merge inside the trace), as cpt_jax.demo does."""
    graphdef, state = nnx.split(model)
    cfg = model.config.text

    def forward(s, ids, positions, mask, vision):
        logits, _ = nnx.merge(graphdef, s).forward(ids, positions, mask, vision)
        return logits

    def prefill(s, ids, positions, mask, vision):
        m = nnx.merge(graphdef, s)
        cache = KVCache.init(cfg, batch, max_len, m.dtype)
        logits, cache = m.forward(ids, positions, mask, vision, cache)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    def step(s, token, cache):
        logits, cache = nnx.merge(graphdef, s).decode(token[:, None], cache)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    def generate(s, ids, positions, mask, vision):
        token, cache = prefill(s, ids, positions, mask, vision)
        tokens = jnp.zeros((batch, new_tokens), jnp.int32).at[:, 0].set(token)

        def body(i, carry):
            tokens, token, cache = carry
            token, cache = step(s, token, cache)
            return tokens.at[:, i].set(token), token, cache

        tokens, _, _ = jax.lax.fori_loop(1, new_tokens, body, (tokens, token, cache))
        return tokens

    return state, dict(forward=jax.jit(forward), prefill=jax.jit(prefill),
                       step=jax.jit(step, donate_argnums=(2,)), generate=jax.jit(generate))


def our_contenders(model, data, args) -> tuple[dict, dict]:
    """Compiled callables of this port (each blocks until its result is ready) and the
    host-side costs: prepare_inputs and compile times."""
    B, T = args.batch, args.new_tokens
    state, fns = our_functions(model, B, data["input_ids"].shape[1] + T, T)
    kwargs = dict(attention_mask=data["attention_mask"], pixel_values=data["pixel_values"],
                  image_grid_thw=data["image_grid_thw"])

    def prepare():
        out = model.prepare_inputs(data["input_ids"], **kwargs)
        jax.block_until_ready(out[:4])
        return out

    prep = interleaved({"prepare": prepare}, args.runs, 1)["prepare"]
    ids, positions, mask, vision, _ = prep[2]
    inputs = (state, ids, positions, mask, vision)
    info: dict = {"prepare_inputs_s": prep[0]}

    forward, info["forward_compile_s"] = _compile(fns["forward"], *inputs)
    prefill, c1 = _compile(fns["prefill"], *inputs)
    token0, cache0 = prefill(*inputs)
    step, c2 = _compile(fns["step"], state, token0, cache0)
    info["decode_loop_compile_s"] = c1 + c2
    generate, info["decode_fused_compile_s"] = _compile(fns["generate"], *inputs)

    def loop():
        token, cache = prefill(*inputs)
        tokens = [token]
        for _ in range(T - 1):
            token, cache = step(state, token, cache)
            tokens.append(token)
        return np.stack([np.asarray(t) for t in tokens], axis=1)

    return dict(
        forward=lambda: jax.block_until_ready(forward(*inputs)),  # to NumPy after timing
        prefill=lambda: np.asarray(jax.block_until_ready(prefill(*inputs))[0]),
        decode_loop=loop,
        decode_fused=lambda: np.asarray(generate(*inputs)),
    ), info


# ----------------------------------------------------------------------------- peer
def load_peer(path: Path, attn: str):
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, attn_implementation=attn, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # never stop early: exactly T new tokens
    return model


def peer_inputs(model, cfg, data) -> dict:
    ids = torch.from_numpy(data["input_ids"])
    types = torch.zeros_like(ids, dtype=torch.int32)
    types[ids == cfg.image_token_id] = 1
    types[ids == cfg.video_token_id] = 2
    mask = torch.from_numpy(data["attention_mask"])
    grid = torch.from_numpy(data["image_grid_thw"])
    with torch.no_grad():  # transformers' own M-RoPE positions, as tests/qwen_reference.py
        positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=types,
                                                  image_grid_thw=grid, attention_mask=mask)
    return dict(input_ids=ids, attention_mask=mask,
                pixel_values=torch.from_numpy(data["pixel_values"]), image_grid_thw=grid,
                mm_token_type_ids=types, position_ids=positions)


def peer_contenders(model, cfg, data, args) -> dict:
    inputs = peer_inputs(model, cfg, data)
    forward_inputs = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    generate_inputs = {k: v for k, v in inputs.items() if k != "position_ids"}
    prompt_len = data["input_ids"].shape[1]
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0

    def forward():
        with torch.no_grad():
            return model(**forward_inputs).logits.float().numpy()

    def generate(new_tokens):
        with torch.no_grad():
            out = model.generate(**generate_inputs, max_new_tokens=new_tokens, do_sample=False,
                                 eos_token_id=None, pad_token_id=pad)
        return out[:, prompt_len:].numpy()

    return dict(forward=forward, prefill=lambda: generate(1),
                decode=lambda: generate(args.new_tokens))


# ----------------------------------------------------------------------------- report
def token_agreement(ours: np.ndarray, theirs: np.ndarray) -> dict:
    same = ours == theirs
    prefix = [int(np.argmin(row)) if not row.all() else len(row) for row in same]
    return {"agreeing": int(same.sum()), "total": int(same.size),
            "fraction": float(same.mean()), "agreeing_prefix_per_row": prefix}


MEASUREMENTS = ("forward", "prefill", "decode_step", "decode")


def markdown_table(report: dict) -> str:
    r = report["results"]
    T = report["workload"]["new_tokens"]
    labels = {
        "forward": "forward: vision + decoder, logits of every token",
        "prefill": "prefill + first token (peer: generate(max_new_tokens=1))",
        "decode_step": "one decode step (derived: (decode - prefill) / (T-1))",
        "decode": f"greedy decode: prefill + {T} tokens (ours: {r['ours']['decode_best']})",
    }
    peers = list(r["peers"])
    rows = ["| measurement | ours (ms) | " + " | ".join(f"transformers {a} (ms)" for a in peers)
            + " | ratio peer/ours | ours tok/s | peer tok/s |",
            "|---|---|" + "---|" * len(peers) + "---|---|---|"]
    for name in MEASUREMENTS:
        ours = r["ours"][f"{name}_s"]
        best = r["peer_best"][name]
        peer = r["peers"][best][f"{name}_s"]
        tokens = report["workload"]["batch"] * (T if name == "decode" else
                                                1 if name == "decode_step" else 0)
        tok = (f"{tokens / ours:.0f}", f"{tokens / peer:.0f}") if tokens else ("", "")
        rows.append(f"| {labels[name]} | {1e3 * ours:.1f} | "
                    + " | ".join(f"{1e3 * r['peers'][a][f'{name}_s']:.1f}" for a in peers)
                    + f" | **{peer / ours:.2f}** (vs {best}) | {tok[0]} | {tok[1]} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=224, help="square image side, pixels")
    parser.add_argument("--text-tokens", type=int, default=64,
                        help="text tokens of the longest prompt (each next one has 6 fewer)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attn", nargs="+", default=["eager", "sdpa"],
                        choices=["eager", "sdpa"], help="transformers attention implementations")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.runs < 5:
        parser.error("--runs must be at least 5")
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2")

    torch.set_num_threads(os.cpu_count())
    t_start = time.perf_counter()
    cfg = preset(args.preset)
    model = Qwen2_5_VL(cfg, dtype=jnp.float32, param_dtype=jnp.float32,
                       max_frame_patches=(args.image_size // cfg.vision.patch_size) ** 2,
                       rngs=nnx.Rngs(args.seed))
    n_params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    data = make_batch(cfg, batch=args.batch, image_size=args.image_size,
                      text_tokens=args.text_tokens, seed=args.seed)
    B, T = args.batch, args.new_tokens
    workload = dict(batch=B, image_size=args.image_size, grid_thw=data["grid"],
                    patches=int(data["pixel_values"].shape[0]),
                    image_tokens_per_prompt=data["image_tokens"], prompt_lengths=data["lengths"],
                    padded_length=int(data["input_ids"].shape[1]), new_tokens=T,
                    runs=args.runs, warmup=args.warmup, dtype="float32", seed=args.seed)
    print(f"preset {args.preset}: {n_params:,} parameters; batch {B}, prompts "
          f"{data['lengths']} tokens left-padded to {data['input_ids'].shape[1]}, "
          f"{data['pixel_values'].shape[0]} patches; {T} new tokens", flush=True)

    ours, info = our_contenders(model, data, args)
    print(f"ours compiled: forward {info['forward_compile_s']:.1f} s, decode loop "
          f"{info['decode_loop_compile_s']:.1f} s, fused {info['decode_fused_compile_s']:.1f} s",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        peer_models = {attn: load_peer(Path(tmp), attn) for attn in args.attn}
    peers = {attn: peer_contenders(m, cfg, data, args) for attn, m in peer_models.items()}

    timed = {}
    for name, ours_names, peer_name in (("forward", ["forward"], "forward"),
                                        ("prefill", ["prefill"], "prefill"),
                                        ("decode", ["decode_loop", "decode_fused"], "decode")):
        contenders = {f"ours/{n}": ours[n] for n in ours_names}
        contenders.update({f"{a}/{name}": peers[a][peer_name] for a in peers})
        timed.update(interleaved(contenders, args.runs, args.warmup))
        print(f"{name}: " + ", ".join(f"{k} {timed[k][0]:.4f} s" for k in contenders), flush=True)

    res_ours = dict(info)
    for key in ("forward", "prefill", "decode_loop", "decode_fused"):
        res_ours[f"{key}_s"], res_ours[f"{key}_runs_s"] = timed[f"ours/{key}"][:2]
    best = "fused" if res_ours["decode_fused_s"] <= res_ours["decode_loop_s"] else "loop"
    res_ours.update(decode_best=best, decode_s=res_ours[f"decode_{best}_s"])
    res_peers = {}
    for a in peers:
        res_peers[a] = {}
        for key in ("forward", "prefill", "decode"):
            res_peers[a][f"{key}_s"], res_peers[a][f"{key}_runs_s"] = timed[f"{a}/{key}"][:2]
    for r in (res_ours, *res_peers.values()):
        r["decode_step_s"] = (r["decode_s"] - r["prefill_s"]) / (T - 1)

    # Checks: logits on real tokens, greedy tokens, our two decoders against each other.
    tokens_loop, tokens_fused = timed["ours/decode_loop"][2], timed["ours/decode_fused"][2]
    if not np.array_equal(tokens_loop, tokens_fused):
        raise RuntimeError(f"our loop and fused decode disagree:\n{tokens_loop}\n{tokens_fused}")
    if not np.array_equal(timed["ours/prefill"][2], tokens_loop[:, 0]):
        raise RuntimeError("our prefill's first token differs from the decode's")
    real = data["attention_mask"].astype(bool)
    checks = {}
    for a in peers:
        our_logits = np.asarray(timed["ours/forward"][2])
        diff = float(np.abs(our_logits[real] - timed[f"{a}/forward"][2][real]).max())
        checks[a] = dict(max_abs_logit_diff=diff,
                         tokens=token_agreement(tokens_loop, timed[f"{a}/decode"][2]))
        if timed[f"{a}/decode"][2].shape != (B, T):
            raise RuntimeError(f"{a} generate gave {timed[f'{a}/decode'][2].shape[1]} new tokens, "
                               f"expected {T}")
        print(f"check vs transformers {a}: max |logit diff| on real tokens {diff:.2e}; greedy "
              f"tokens agreeing {checks[a]['tokens']['agreeing']}/{checks[a]['tokens']['total']}")

    peer_best = {n: min(res_peers, key=lambda a: res_peers[a][f"{n}_s"]) for n in MEASUREMENTS}
    ratios = {n: res_peers[peer_best[n]][f"{n}_s"] / res_ours[f"{n}_s"] for n in MEASUREMENTS}
    report = dict(
        benchmark="forward_vs_transformers",
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        machine=dict(cpu_count=os.cpu_count(), platform=platform.platform(),
                     processor=cpu_model(), python=sys.version.split()[0],
                     jax_backend=jax.default_backend(), torch_threads=torch.get_num_threads()),
        versions=dict(jax=jax.__version__, jaxlib=package_version("jaxlib"),
                      flax=package_version("flax"),
                      transformers=transformers.__version__, torch=torch.__version__),
        preset=args.preset, parameters=int(n_params), workload=workload,
        results=dict(ours=res_ours, peers=res_peers, peer_best=peer_best,
                     ratio_peer_over_ours=ratios,
                     decode_tokens_per_s=dict(
                         ours=B * T / res_ours["decode_s"],
                         peer=B * T / res_peers[peer_best["decode"]]["decode_s"])),
        checks=checks,
        target="forward and decode no slower than transformers on CPU: ratio >= 1.0",
        target_met={n: ratios[n] >= 1.0 for n in ("forward", "decode")},
        total_wall_s=time.perf_counter() - t_start,
    )
    print()
    print(markdown_table(report))
    print(f"\nhost prepare_inputs {info['prepare_inputs_s'] * 1e3:.1f} ms (not in ours' forward); "
          f"compile: forward {info['forward_compile_s']:.1f} s, decode loop "
          f"{info['decode_loop_compile_s']:.1f} s, fused {info['decode_fused_compile_s']:.1f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['total_wall_s']:.0f} s in all)")

    reference = "eager" if "eager" in checks else next(iter(checks))
    if checks[reference]["max_abs_logit_diff"] > LOGIT_TOLERANCE:
        raise SystemExit(f"FAIL: logits differ from transformers ({reference}) by "
                         f"{checks[reference]['max_abs_logit_diff']:.2e} > {LOGIT_TOLERANCE}")
    if checks[reference]["tokens"]["fraction"] < MIN_TOKEN_AGREEMENT:
        raise SystemExit(f"FAIL: only {checks[reference]['tokens']['fraction']:.0%} of the greedy "
                         f"tokens agree with transformers ({reference})")
    return report


if __name__ == "__main__":
    main()
