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
   `torch.no_grad()`. Logits must agree on the real tokens (max |diff| <= 1e-3).
2. greedy decode: prefill + T new tokens. Ours: a jitted prefill into a KV cache, then T-1
   jitted decode steps from a Python loop ("loop"), and the same inside one jit with
   `lax.fori_loop` ("fused"); the better of the two is reported. The peer is
   `model.generate(do_sample=False, max_new_tokens=T)` with no eos (so no row stops early).
   The number of agreeing greedy tokens is reported (random weights can give near-ties).

Times are medians of --runs timed runs after --warmup untimed ones; ratio = peer / ours, so
> 1 means this port is faster. Compile time (lower + compile) is reported separately.
Writes a JSON report to --out and prints a markdown table.
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
    pixel_values = rng.standard_normal((batch * side * side, cfg.vision.patch_dim)).astype(np.float32)
    grid_thw = np.array([grid] * batch, np.int64)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values,
                image_grid_thw=grid_thw, lengths=[len(r) for r in rows], grid=list(grid),
                image_tokens=n_image)


# ----------------------------------------------------------------------------- timing
def _median_time(fn, runs: int, warmup: int) -> tuple[float, list[float], object]:
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, out


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


def bench_ours(model, data, args) -> dict:
    B, T = args.batch, args.new_tokens
    prompt_len = data["input_ids"].shape[1]
    state, fns = our_functions(model, B, prompt_len + T, T)
    kwargs = dict(attention_mask=data["attention_mask"], pixel_values=data["pixel_values"],
                  image_grid_thw=data["image_grid_thw"])

    def prepare():
        out = model.prepare_inputs(data["input_ids"], **kwargs)
        jax.block_until_ready(out[:4])
        return out

    t_prepare, _, prepared = _median_time(prepare, args.runs, 1)
    ids, positions, mask, vision, _ = prepared
    inputs = (state, ids, positions, mask, vision)

    res: dict = {"prepare_inputs_s": t_prepare}
    forward, res["forward_compile_s"] = _compile(fns["forward"], *inputs)
    t, times, logits = _median_time(lambda: jax.block_until_ready(forward(*inputs)),
                                    args.runs, args.warmup)
    res.update(forward_s=t, forward_runs_s=times)
    logits = np.asarray(logits)

    # Decode, Python loop over a jitted step.
    prefill, c1 = _compile(fns["prefill"], *inputs)
    token0, cache0 = prefill(*inputs)
    step, c2 = _compile(fns["step"], state, token0, cache0)
    res["decode_loop_compile_s"] = c1 + c2

    def loop():
        token, cache = prefill(*inputs)
        tokens = [token]
        for _ in range(T - 1):
            token, cache = step(state, token, cache)
            tokens.append(token)
        return np.stack([np.asarray(t) for t in tokens], axis=1)

    t, times, tokens_loop = _median_time(loop, args.runs, args.warmup)
    res.update(decode_loop_s=t, decode_loop_runs_s=times)
    t, _, _ = _median_time(lambda: jax.block_until_ready(prefill(*inputs)), args.runs, 1)
    res["prefill_only_s"] = t  # where the loop's time goes: prefill vs the T-1 steps

    # Decode, prefill + fori_loop over the steps inside one jit.
    generate, res["decode_fused_compile_s"] = _compile(fns["generate"], *inputs)
    t, times, tokens_fused = _median_time(lambda: np.asarray(generate(*inputs)),
                                          args.runs, args.warmup)
    res.update(decode_fused_s=t, decode_fused_runs_s=times)
    if not np.array_equal(tokens_loop, tokens_fused):
        raise RuntimeError(f"our loop and fused decode disagree:\n{tokens_loop}\n{tokens_fused}")
    best = "fused" if res["decode_fused_s"] <= res["decode_loop_s"] else "loop"
    res.update(decode_best=best, decode_s=res[f"decode_{best}_s"])
    return res, logits, tokens_loop


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
    with torch.no_grad():
        positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=types,
                                                  image_grid_thw=grid, attention_mask=mask)
    return dict(input_ids=ids, attention_mask=mask,
                pixel_values=torch.from_numpy(data["pixel_values"]), image_grid_thw=grid,
                mm_token_type_ids=types, position_ids=positions)


def bench_peer(model, cfg, data, args) -> tuple[dict, np.ndarray, np.ndarray]:
    inputs = peer_inputs(model, cfg, data)
    forward_inputs = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    generate_inputs = {k: v for k, v in inputs.items() if k != "position_ids"}
    T = args.new_tokens
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0

    def forward():
        with torch.no_grad():
            return model(**forward_inputs).logits

    def generate():
        with torch.no_grad():
            return model.generate(**generate_inputs, max_new_tokens=T, do_sample=False,
                                  eos_token_id=None, pad_token_id=pad)

    res: dict = {}
    t, times, logits = _median_time(forward, args.runs, args.warmup)
    res.update(forward_s=t, forward_runs_s=times)
    t, times, sequences = _median_time(generate, args.runs, args.warmup)
    res.update(decode_s=t, decode_runs_s=times)
    new = sequences[:, data["input_ids"].shape[1]:].numpy()
    if new.shape != (args.batch, T):
        raise RuntimeError(f"generate returned {new.shape[1]} new tokens, expected {T}")
    return res, logits.float().numpy(), new


# ----------------------------------------------------------------------------- report
def token_agreement(ours: np.ndarray, theirs: np.ndarray) -> dict:
    same = ours == theirs
    prefix = [int(np.argmin(row)) if not row.all() else len(row) for row in same]
    return {"agreeing": int(same.sum()), "total": int(same.size),
            "fraction": float(same.mean()), "agreeing_prefix_per_row": prefix}


def markdown_table(report: dict) -> str:
    r, peers = report["results"], report["results"]["peers"]
    best = r["peer_best"]
    B, T = report["workload"]["batch"], report["workload"]["new_tokens"]
    rows = ["| measurement | ours (s) | transformers eager (s) | transformers sdpa (s) "
            "| ratio peer/ours | ours tok/s | peer tok/s |",
            "|---|---|---|---|---|---|---|"]
    for name, label in (("forward", "forward (vision + decoder, full logits)"),
                        ("decode", f"greedy decode, prefill + {T} tokens "
                                   f"(ours: {r['ours']['decode_best']})")):
        ours = r["ours"][f"{name}_s"]
        peer = min(peers[a][f"{name}_s"] for a in peers)
        tok = (f"{B * T / ours:.0f}", f"{B * T / peer:.0f}") if name == "decode" else ("", "")
        rows.append(f"| {label} | {ours:.4f} | {peers['eager'][f'{name}_s']:.4f} | "
                    f"{peers['sdpa'][f'{name}_s']:.4f} | **{peer / ours:.2f}** "
                    f"(vs {best[name]}) | {tok[0]} | {tok[1]} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=224, help="square image side, pixels")
    parser.add_argument("--text-tokens", type=int, default=64,
                        help="text tokens of the longest prompt (each next one has 6 fewer)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
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
                       rngs=nnx.Rngs(args.seed))
    n_params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    data = make_batch(cfg, batch=args.batch, image_size=args.image_size,
                      text_tokens=args.text_tokens, seed=args.seed)
    workload = dict(batch=args.batch, image_size=args.image_size, grid_thw=data["grid"],
                    patches=int(data["pixel_values"].shape[0]),
                    image_tokens_per_prompt=data["image_tokens"], prompt_lengths=data["lengths"],
                    padded_length=int(data["input_ids"].shape[1]), new_tokens=args.new_tokens,
                    runs=args.runs, warmup=args.warmup, dtype="float32", seed=args.seed)
    print(f"preset {args.preset}: {n_params:,} parameters; batch {args.batch}, prompts "
          f"{data['lengths']} tokens left-padded to {data['input_ids'].shape[1]}, "
          f"{data['pixel_values'].shape[0]} patches; {args.new_tokens} new tokens", flush=True)

    ours, our_logits, our_tokens = bench_ours(model, data, args)
    print(f"ours: forward {ours['forward_s']:.4f} s (compile {ours['forward_compile_s']:.1f} s), "
          f"decode loop {ours['decode_loop_s']:.4f} s, fused {ours['decode_fused_s']:.4f} s",
          flush=True)

    peers, checks = {}, {}
    real = data["attention_mask"].astype(bool)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        for attn in args.attn:
            peer = load_peer(Path(tmp), attn)
            peers[attn], peer_logits, peer_tokens = bench_peer(peer, cfg, data, args)
            diff = float(np.abs(our_logits[real] - peer_logits[real]).max())
            checks[attn] = dict(max_abs_logit_diff=diff,
                                tokens=token_agreement(our_tokens, peer_tokens))
            print(f"transformers {attn}: forward {peers[attn]['forward_s']:.4f} s, generate "
                  f"{peers[attn]['decode_s']:.4f} s; max |logit diff| on real tokens {diff:.2e}; "
                  f"greedy tokens agreeing {checks[attn]['tokens']['agreeing']}/"
                  f"{checks[attn]['tokens']['total']}", flush=True)
            del peer

    best = {name: min(peers, key=lambda a: peers[a][f"{name}_s"]) for name in ("forward", "decode")}
    ratios = {name: peers[best[name]][f"{name}_s"] / ours[f"{name}_s"]
              for name in ("forward", "decode")}
    tokens = args.batch * args.new_tokens
    report = dict(
        benchmark="forward_vs_transformers",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=dict(cpu_count=os.cpu_count(), platform=platform.platform(),
                     processor=platform.processor() or platform.machine(),
                     python=sys.version.split()[0], jax_backend=jax.default_backend(),
                     torch_threads=torch.get_num_threads()),
        versions=dict(jax=jax.__version__, jaxlib=jax.lib.__version__ if hasattr(jax, "lib")
                      else None, flax=__import__("flax").__version__,
                      transformers=transformers.__version__, torch=torch.__version__),
        preset=args.preset, parameters=int(n_params), workload=workload,
        results=dict(ours=ours, peers=peers, peer_best=best,
                     ratio_peer_over_ours=ratios,
                     decode_tokens_per_s=dict(
                         ours=tokens / ours["decode_s"],
                         peer=tokens / peers[best["decode"]]["decode_s"])),
        checks=checks,
        target="forward and decode no slower than transformers on CPU: ratio >= 1.0",
        total_wall_s=time.perf_counter() - t_start,
    )
    print()
    print(markdown_table(report))
    print(f"\nhost prepare_inputs {ours['prepare_inputs_s'] * 1e3:.1f} ms (not in forward); "
          f"compile: forward {ours['forward_compile_s']:.1f} s, decode loop "
          f"{ours['decode_loop_compile_s']:.1f} s, fused {ours['decode_fused_compile_s']:.1f} s; "
          f"our prefill alone {ours['prefill_only_s']:.4f} s")
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
