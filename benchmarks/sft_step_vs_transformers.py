"""The SFT train step of this port against a PyTorch train step of transformers' Qwen2.5-VL.

    JAX_PLATFORMS=cpu python benchmarks/sft_step_vs_transformers.py --preset small

Same weights on both sides, as in `forward_vs_transformers.py` (whose helpers this script
imports): our model from `preset(NAME)` with random weights, saved as a Hugging Face folder
and loaded by transformers' `Qwen2_5_VLForConditionalGeneration` (fp32, `eager` and `sdpa`
attention; the ratio is taken against the faster).

Workload: B SFT rows, each `<text> <vision_start> <image>*n <vision_end> <text> <response>`
with one synthetic image (random patches), right-padded (as the SFT pipeline pads); the loss
is the token-mean cross-entropy over the response tokens of the whole batch, split into
--micro-batches micro-batches whose gradients are summed before one update.

Contenders, one update each call unless said:
1. ours: `cpt_jax.sft.make_sft_step` (one `jax.jit`, state donated, micro-batches scanned)
   with `cpt_jax.optim.make_optimizer` (global-norm clip 1.0, AdamW, constant lr), on the
   batch `stack_micro_batches` makes; lower + compile timed apart.
2. ours, --steps-per-call K updates per call: `cpt_jax.sft.make_sft_steps` (the same
   update scanned K times in one jit, on K copies of the batch; `sft.steps_per_call` in a
   run's config); its time per call / K is its time per update.
3. transformers: `zero_grad`; per micro-batch `model(...).logits`, summed cross-entropy over
   the response tokens / the batch's response tokens, `backward()`;
   `clip_grad_norm_(1.0)`; `torch.optim.AdamW` (same lr, betas, eps, weight decay) `step()`.
   M-RoPE positions from transformers' own `get_rope_index`, computed once beforehand.

All start from the same weights and take the same updates on the same batch, so their losses
must agree at every update (max |diff| <= 1e-3 against eager, else exit 1), and so must the
gradient norms. Times are medians of --runs calls after --warmup, in interleaved rounds.
ratio = peer time / ours (> 1: this port is faster); tokens/s counts the real (unpadded)
tokens. MFU = model FLOPs (`cpt_jax.flops`: 3 x the forward, padding and cross-image attention
not counted) / time / the machine's measured float32 matmul peak (`machine.matmul_peak_flops`).
Writes a JSON report to --out and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from forward_vs_transformers import _compile, interleaved, load_peer, peer_inputs
from machine import matmul_peak_flops
from sampler_vs_transformers import environment

from cpt_jax.flops import text_forward_flops, vision_forward_flops
from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL, preset, save_pretrained
from cpt_jax.optim import make_optimizer
from cpt_jax.sft import TrainState, make_sft_step, make_sft_steps, stack_micro_batches

LEARNING_RATE, WEIGHT_DECAY, CLIP, BETAS, EPS = 1e-5, 0.01, 1.0, (0.9, 0.999), 1e-8
LOSS_TOLERANCE = 1e-3
DEFAULT_OUT = Path(__file__).parent / "results" / "sft_step_vs_transformers.json"


# ----------------------------------------------------------------------------- workload
def make_sft_batch(cfg, *, batch: int, image_size: int, prompt_tokens: int,
                   response_tokens: int, seed: int) -> dict:
    """Right-padded SFT rows of different lengths in the pipeline's batch format, one random
    image each; `loss_mask` marks the response."""
    patch, merge = cfg.vision.patch_size, cfg.vision.spatial_merge_size
    if image_size % (patch * merge):
        raise ValueError(f"--image-size must be a multiple of {patch * merge}")
    side = image_size // patch
    n_image = side * side // cfg.vision.merge_unit
    special = {cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id, cfg.image_token_id,
               cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}
    allowed = np.setdiff1d(np.arange(cfg.text.vocab_size), [i for i in special if i is not None])
    rng = np.random.default_rng(seed)
    rows, responses = [], []
    for i in range(batch):
        n_text = max(2, prompt_tokens - 6 * (i % 8))
        n_response = max(1, response_tokens - 4 * (i % 8))
        before = int(rng.integers(1, n_text))
        text = rng.choice(allowed, n_text + n_response).tolist()
        rows.append(text[:before] + [cfg.vision_start_token_id] + [cfg.image_token_id] * n_image
                    + [cfg.vision_end_token_id] + text[before:])
        responses.append(n_response)
    width = max(map(len, rows))
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    ids = np.full((batch, width), pad, np.int32)
    mask = np.zeros((batch, width), np.int32)
    loss_mask = np.zeros((batch, width), np.int32)
    for i, (row, n_response) in enumerate(zip(rows, responses, strict=True)):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
        loss_mask[i, len(row) - n_response:len(row)] = 1
    pixel_values = rng.standard_normal((batch * side * side, cfg.vision.patch_dim))
    return dict(input_ids=ids, attention_mask=mask, loss_mask=loss_mask,
                pixel_values=pixel_values.astype(np.float32),
                image_grid_thw=np.array([(1, side, side)] * batch, np.int64),
                num_patches=np.int32(batch * side * side), lengths=[len(r) for r in rows],
                responses=responses, patches_per_image=side * side)


def split_rows(data: dict, micro_batches: int) -> list[dict]:
    """The batch as `micro_batches` pipeline batches of consecutive rows, each with its
    images."""
    rows = len(data["input_ids"])
    if rows % micro_batches:
        raise ValueError(f"--batch {rows} is not divisible by --micro-batches {micro_batches}")
    size, per_image = rows // micro_batches, data["patches_per_image"]
    parts = []
    for m in range(micro_batches):
        r = slice(m * size, (m + 1) * size)
        p = slice(m * size * per_image, (m + 1) * size * per_image)
        parts.append(dict(input_ids=data["input_ids"][r], attention_mask=data["attention_mask"][r],
                          loss_mask=data["loss_mask"][r], pixel_values=data["pixel_values"][p],
                          image_grid_thw=data["image_grid_thw"][r],
                          num_patches=np.int32(size * per_image)))
    return parts


def step_flops(cfg, data: dict) -> float:
    """Model FLOPs of one train step: 3 x the forward over the real tokens and patches, the
    output head at the positions that predict a response token (what the loss needs)."""
    frames = [data["patches_per_image"]] * len(data["input_ids"])
    return 3 * (text_forward_flops(cfg.text, data["lengths"], data["responses"])
                + vision_forward_flops(cfg.vision, frames))


# ----------------------------------------------------------------------------- ours
def our_step(model: Qwen2_5_VL, data: dict, micro_batches: int, steps: int = 1) -> tuple:
    """A zero-argument callable making `steps` updates of our own copy of the model's state in
    one call (returning each update's (loss, grad_norm)) and its compile time."""
    optimizer = make_optimizer(learning_rate=LEARNING_RATE, total_steps=1_000_000,
                               schedule="constant", weight_decay=WEIGHT_DECAY, grad_clip=CLIP,
                               b1=BETAS[0], b2=BETAS[1], eps=EPS)
    parts = split_rows(data, micro_batches)
    if steps == 1:
        batch = stack_micro_batches(parts, model)
        step = make_sft_step(model, optimizer, micro_batches=micro_batches)
    else:
        batch = stack_micro_batches(parts * steps, model, steps=steps)
        step = make_sft_steps(model, optimizer, micro_batches=micro_batches, steps=steps)
    # A copy: each contender donates its own state.
    holder = {"state": jax.tree.map(jnp.array, TrainState.create(model, optimizer))}
    compiled, compile_s = _compile(step, holder["state"], batch)

    def run() -> list[tuple[float, float]]:
        holder["state"], metrics = compiled(holder["state"], batch)
        return list(zip(np.atleast_1d(metrics["loss"]).tolist(),
                        np.atleast_1d(metrics["grad_norm"]).tolist(), strict=True))

    return run, dict(compile_s=compile_s, steps_per_call=steps)


# ----------------------------------------------------------------------------- peer
def peer_step(model, cfg, data: dict, micro_batches: int):
    """One update of the transformers model: the same loss, clipping and AdamW."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=BETAS, eps=EPS,
                                  weight_decay=WEIGHT_DECAY)
    micros = []
    for part in split_rows(data, micro_batches):
        inputs = peer_inputs(model, cfg, dict(part, input_ids=part["input_ids"].astype(np.int64),
                                              attention_mask=part["attention_mask"].astype(
                                                  np.int64)))
        inputs.pop("mm_token_type_ids")
        labels = torch.from_numpy(np.where(part["loss_mask"] == 1, part["input_ids"], -100))
        micros.append((inputs, labels[:, 1:].reshape(-1).long()))
    tokens = float(sum(int((labels != -100).sum()) for _, labels in micros))

    def run() -> list[tuple[float, float]]:
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for inputs, labels in micros:
            logits = model(**inputs).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), labels, ignore_index=-100,
                reduction="sum")
            (nll / tokens).backward()
            loss_sum += float(nll.detach())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP))
        optimizer.step()
        return [(loss_sum / tokens, grad_norm)]

    return run


# ----------------------------------------------------------------------------- report
def table(report: dict) -> str:
    r, w = report["results"], report["workload"]
    rows = [f"| SFT step, {w['batch']} rows ({w['micro_batches']} micro-batches), "
            f"{w['real_tokens']} tokens, {w['patches']} patches | median (ms) | tokens/s "
            "| model TFLOP/s | MFU | ratio peer/ours |", "|---|---|---|---|---|---|"]
    ours = {"ours": r["ours"]}
    if "ours_steps_per_call" in r:
        ours[f"ours, {w['steps_per_call']} steps per call"] = r["ours_steps_per_call"]
    for name, res in (*ours.items(), *((f"transformers {a}", p)
                                       for a, p in r["peers"].items())):
        ratio = (f"**{r['peers'][r['peer_best']]['median_s'] / res['median_s']:.2f}** "
                 f"(vs {r['peer_best']})" if name in ours else "")
        rows.append(f"| {name} | {1e3 * res['median_s']:.1f} | {res['tokens_per_s']:.0f} | "
                    f"{res['model_flops_per_s'] / 1e12:.3f} | {res['mfu']:.1%} | {ratio} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=8, help="rows per update")
    parser.add_argument("--micro-batches", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=224, help="square image side, pixels")
    parser.add_argument("--prompt-tokens", type=int, default=64,
                        help="text tokens of the longest prompt (the next ones have 6 fewer)")
    parser.add_argument("--response-tokens", type=int, default=64,
                        help="tokens of the longest response (the next ones have 4 fewer)")
    parser.add_argument("--steps-per-call", type=int, default=4,
                        help="updates per call of the second contender of ours (1: none)")
    parser.add_argument("--scan-layers", action="store_true",
                        help="scan the layers (the default for TPU runs) instead of unrolling")
    parser.add_argument("--attn", nargs="+", default=["eager", "sdpa"],
                        choices=["eager", "sdpa"], help="transformers attention implementations")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if min(args.runs, args.batch, args.micro_batches, args.steps_per_call) < 1 or args.warmup < 0:
        parser.error("--runs, --batch, --micro-batches and --steps-per-call must be >= 1, "
                     "--warmup >= 0")

    torch.set_num_threads(os.cpu_count())
    t_start = time.perf_counter()
    peak = matmul_peak_flops()
    print(f"matmul peak: {peak['peak'] / 1e9:.0f} GFLOP/s (jax {peak['jax'] / 1e9:.0f}, torch "
          f"{peak['torch'] / 1e9:.0f})", flush=True)
    cfg = preset(args.preset)
    model = Qwen2_5_VL(cfg, dtype=jnp.float32, param_dtype=jnp.float32,
                       max_frame_patches=(args.image_size // cfg.vision.patch_size) ** 2,
                       scan_layers=args.scan_layers, rngs=nnx.Rngs(args.seed))
    parameters = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    data = make_sft_batch(cfg, batch=args.batch, image_size=args.image_size,
                          prompt_tokens=args.prompt_tokens,
                          response_tokens=args.response_tokens, seed=args.seed)
    flops = step_flops(cfg, data)
    real_tokens = int(sum(data["lengths"]))
    workload = dict(batch=args.batch, micro_batches=args.micro_batches,
                    image_size=args.image_size, patches=int(data["num_patches"]),
                    row_lengths=data["lengths"], response_tokens=data["responses"],
                    padded_length=int(data["input_ids"].shape[1]), real_tokens=real_tokens,
                    model_flops_per_step=flops, scan_layers=args.scan_layers,
                    steps_per_call=args.steps_per_call,
                    runs=args.runs, warmup=args.warmup, dtype="float32",
                    learning_rate=LEARNING_RATE, seed=args.seed)
    print(f"preset {args.preset}: {parameters:,} parameters; {args.batch} rows of "
          f"{data['lengths']} tokens right-padded to {data['input_ids'].shape[1]}, "
          f"{data['num_patches']} patches; {flops:.3e} model FLOPs per step", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)  # before our state takes (and donates) the model's arrays
        peer_models = {attn: load_peer(Path(tmp), attn) for attn in args.attn}
    contenders, info = {}, {}
    ours = ["ours"] + (["ours_steps_per_call"] if args.steps_per_call > 1 else [])
    for name in ours:
        steps = args.steps_per_call if name == "ours_steps_per_call" else 1
        contenders[name], info[name] = our_step(model, data, args.micro_batches, steps)
        print(f"{name} compiled in {info[name]['compile_s']:.1f} s", flush=True)
    contenders.update({a: peer_step(m, cfg, data, args.micro_batches)
                       for a, m in peer_models.items()})

    losses: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}

    def recording(name: str):
        def call():
            out = contenders[name]()
            losses[name].extend(out)  # one (loss, grad norm) per update
            return out
        return call

    timed = interleaved({n: recording(n) for n in contenders}, args.runs, args.warmup)
    results = {}
    for name, (call_s, calls_s, _) in timed.items():
        per_call = info.get(name, {}).get("steps_per_call", 1)
        median_s, runs_s = call_s / per_call, [t / per_call for t in calls_s]
        results[name] = dict(median_s=median_s, runs_s=runs_s,
                             tokens_per_s=real_tokens / median_s,
                             model_flops_per_s=flops / median_s,
                             mfu=flops / median_s / peak["peak"],
                             losses=[loss for loss, _ in losses[name]],
                             grad_norms=[norm for _, norm in losses[name]])
        print(f"{name}: {median_s:.4f} s per step, losses "
              f"{[round(x, 5) for x in results[name]['losses']]}", flush=True)
    for name in ours:
        results[name].update(info[name])
    peers = {a: results.pop(a) for a in peer_models}
    best = min(peers, key=lambda a: peers[a]["median_s"])
    checks = {}
    for a, res in peers.items():
        for name in ours:  # over the updates both made (ours, K per call, made more)
            n = min(len(res["losses"]), len(results[name]["losses"]))
            loss_diff = float(np.abs(np.subtract(results[name]["losses"][:n],
                                                 res["losses"][:n])).max())
            norm_rel = float(np.abs(np.subtract(results[name]["grad_norms"][:n],
                                                res["grad_norms"][:n])).max()
                             / max(res["grad_norms"]))
            checks[f"{name}_vs_{a}"] = dict(max_abs_loss_diff=loss_diff,
                                            max_rel_grad_norm_diff=norm_rel, updates=n)
            print(f"check {name} vs transformers {a}: max |loss diff| {loss_diff:.2e}, max "
                  f"relative grad-norm diff {norm_rel:.2e} over {n} updates")
    ratio = peers[best]["median_s"] / results["ours"]["median_s"]
    extra = {}
    if "ours_steps_per_call" in results:
        multi = results["ours_steps_per_call"]
        extra = dict(ours_steps_per_call=multi,
                     ratio_peer_over_ours_steps_per_call=peers[best]["median_s"]
                     / multi["median_s"])
    report = dict(
        benchmark="sft_step_vs_transformers",
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **environment(), matmul_peak_flops_per_s=peak,
        preset=args.preset, parameters=int(parameters), workload=workload,
        results=dict(ours=results["ours"], peers=peers, peer_best=best,
                     ratio_peer_over_ours=ratio, **extra),
        checks=checks,
        target="tokens/s at least 1.2x transformers' PyTorch train step; MFU at least 40%",
        target_met={name: dict(ratio=peers[best]["median_s"] / results[name]["median_s"] >= 1.2,
                               mfu=results[name]["mfu"] >= 0.4) for name in ours},
        total_wall_s=time.perf_counter() - t_start,
    )
    print()
    print(table(report))
    compiles = ", ".join(f"{name} {info[name]['compile_s']:.1f} s" for name in ours)
    print(f"\nour compile: {compiles} (not in the times); {flops:.3e} model FLOPs per step")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['total_wall_s']:.0f} s in all)")

    reference = "eager" if "eager" in peers else best
    for name in ours:
        diff = checks[f"{name}_vs_{reference}"]["max_abs_loss_diff"]
        if diff > LOSS_TOLERANCE:
            raise SystemExit(f"FAIL: {name}'s losses differ from transformers ({reference}) "
                             f"by {diff:.2e} > {LOSS_TOLERANCE}")
    return report


if __name__ == "__main__":
    main()
