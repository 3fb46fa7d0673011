"""Benchmark: our stitched inference against MONAI, a per-tile loop, and the bare forward pass.

"ours" is what rescoring, `evaluate` and `predict` run: the model prepared once for inference
(segcore.infer.prepare: batch norm folded, the device's inference layout) and predict_probs;
with --compiled also that model compiled by TorchInductor with its weights frozen, the compile
time and the number of images after which it has paid for itself (the product does not compile:
on the project's CPU it did not pay, docs/benchmarks.md).
MONAI's sliding_window_inference and the per-tile loop get the plain model in eval mode, in our
precision (segcore.device.precision_for: bf16 autocast on CUDA and on CPUs with native bf16);
where that is bf16, MONAI also runs in float32, as a user would call it without autocast.
Prints median milliseconds per 400x200 image (over --repeats runs) and ratios
measured in this same run; the shared, noisy machines make absolute numbers meaningless across
runs.

    python bench/infer.py [--repeats 5] [--images 4] [--device cpu|cuda] [--compiled]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segcore.device import autocast_for, memory_format_for, precision_for
from segcore.infer import layout_of, predict_probs, prepare, tile_batch, tile_starts
from segcore.model import build_model
from segcore.synthetic import synthetic_dataset

MODELS = {"cpu-recipe (d4 w16)": (4, 16), "reference (d4 w64)": (4, 64)}
TILE, OVERLAP = 64, 0.5


def timed(fns: dict, images, device, repeats: int) -> dict:
    """Median seconds per image of each fn(image), repeats interleaved round-robin so that the
    machine's drift (other load, clock changes) hits every method alike."""
    for fn in fns.values():
        fn(images[0])  # warm-up (allocations, cuDNN autotuning)
    runs = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for image in images:
                fn(image)
            if device.type == "cuda":
                torch.cuda.synchronize()
            runs[name].append((time.perf_counter() - start) / len(images))
    return {name: statistics.median(r) for name, r in runs.items()}


def tiles_of(x: torch.Tensor) -> torch.Tensor:
    """(C, H, W) -> (N, C, TILE, TILE): the tiles our stitcher uses."""
    h, w = x.shape[1:]
    return torch.stack([x[:, y : y + TILE, x0 : x0 + TILE] for y in tile_starts(h, TILE, OVERLAP)
                        for x0 in tile_starts(w, TILE, OVERLAP)])  # fmt: skip


def compiled(ready: torch.nn.Module, tiles: int, device: torch.device) -> torch.nn.Module:
    """The prepared model compiled by TorchInductor with its weights frozen into the graph, for
    the batches predict_probs runs on an image of `tiles` tiles (all compiled here)."""
    fast = torch.compile(ready, dynamic=False, options={"freezing": True})
    batch = tile_batch(ready, TILE, device)
    for n in {batch, tiles % batch} - {0}:
        probe = torch.zeros(n, ready.in_channels, TILE, TILE, device=device)
        with torch.inference_mode(), autocast_for(device):
            fast(probe.contiguous(memory_format=layout_of(ready)))
    return fast


def methods(model, ready, other, fast, device):
    from monai.inferers import sliding_window_inference

    def as_tensor(image):
        return torch.from_numpy(image.transpose(2, 0, 1)).to(device)

    def ours(image):
        return predict_probs(ready, image, tile=TILE, overlap=OVERLAP)

    def ours_other_layout(image):
        return predict_probs(other, image, tile=TILE, overlap=OVERLAP)

    def ours_compiled(image):
        return predict_probs(fast, image, tile=TILE, overlap=OVERLAP)

    def monai(sw_batch, cast=True):
        @torch.no_grad()
        def run(image):
            with autocast_for(device) if cast else nullcontext():
                return sliding_window_inference(
                    as_tensor(image)[None], (TILE, TILE), sw_batch,
                    lambda t: torch.softmax(model(t).float(), 1), overlap=OVERLAP, mode="constant",
                )  # fmt: skip

        return run

    @torch.no_grad()
    def per_tile(image):  # the reference project's loop: one tile at a time
        x = as_tensor(image)
        out = torch.zeros(model.num_classes, *x.shape[1:], device=device)
        count = torch.zeros(x.shape[1:], device=device)
        for y in tile_starts(x.shape[1], TILE, OVERLAP):
            for x0 in tile_starts(x.shape[2], TILE, OVERLAP):
                with autocast_for(device):
                    p = torch.softmax(model(x[None, :, y : y + TILE, x0 : x0 + TILE]).float(), 1)
                out[:, y : y + TILE, x0 : x0 + TILE] += p[0]
                count[y : y + TILE, x0 : x0 + TILE] += 1
        return out / count

    @torch.inference_mode()
    def forward_only(image):  # the same model, tiles and batches; no cropping or stitching
        layout = memory_format_for(device)
        tiles = tiles_of(as_tensor(image)).contiguous(memory_format=layout)
        batch = tile_batch(ready, TILE, device)
        with autocast_for(device):
            return [ready(tiles[i : i + batch]) for i in range(0, len(tiles), batch)]

    return ours, ours_other_layout, ours_compiled, monai, per_tile, forward_only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compiled", action="store_true", help="also time torch.compile")
    args = parser.parse_args()
    device = torch.device(args.device)
    images = synthetic_dataset(args.images, seed=7).images
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.images} images 400x200, tile {TILE}, overlap {OVERLAP}, median of "
          f"{args.repeats}")  # fmt: skip
    for label, (depth, width) in MODELS.items():
        torch.manual_seed(0)
        model = build_model("unet", 1, 3, depth, width, 512).to(device).eval()
        ready = prepare(model, device)
        used = layout_of(ready)
        flip = torch.contiguous_format if used == torch.channels_last else torch.channels_last
        other = prepare(model, device, flip)
        n_tiles = len(tiles_of(torch.zeros(1, 400, 200)))
        started = time.perf_counter()
        fast = compiled(ready, n_tiles, device) if args.compiled else None
        compile_s = time.perf_counter() - started
        ours, ours_other, ours_fast, monai, per_tile, forward_only = methods(
            model, ready, other, fast, device
        )
        fns = {"ours": ours, "other": ours_other, "loop": per_tile, "fwd": forward_only}
        if fast is not None:
            fns["compiled"] = ours_fast
        fns.update({b: monai(b) for b in (4, 16, 64)})
        bf16 = precision_for(device) == "bf16"
        if bf16:
            fns.update({("fp32", b): monai(b, cast=False) for b in (4, 16, 64)})
        t = timed(fns, images, device, args.repeats)
        t_ours, t_loop, t_fwd = t["ours"], t["loop"], t["fwd"]
        monai_times = {b: t[b] for b in (4, 16, 64)}
        best_b = min(monai_times, key=monai_times.get)
        user_b = min((4, 16, 64), key=lambda b: t[("fp32", b)]) if bf16 else best_b
        t_user = t[("fp32", user_b)] if bf16 else monai_times[best_b]
        # on 384 x 192 the tile offsets of both are 0, 32, ..., so the outputs must match
        crop = images[0][:384, :192]
        diff = (ours(crop) - monai(best_b)(crop)[0]).abs().max().item()
        plain = predict_probs(model, crop, tile=TILE, overlap=OVERLAP)
        same = (plain - monai(best_b)(crop)[0]).abs().max().item()
        if fast is not None:
            diff_fast = (ours_fast(crop) - monai(best_b)(crop)[0]).abs().max().item()
        print(f"\n{label}: {n_tiles} tiles per image; ours and the loop in {precision_for(device)}")
        print(f"  {'method':<42}{'ms/image':>10}{'time / ours':>13}")
        names = {torch.channels_last: "channels_last", torch.contiguous_format: "NCHW"}
        rows = [(f"ours (prepared, {names[used]})", t_ours),
                (f"ours (prepared, {names[flip]})", t["other"]),
                (f"MONAI sliding_window (sw_batch {best_b})", monai_times[best_b]),
                *([(f"MONAI, float32 (sw_batch {user_b})", t_user)] if bf16 else []),
                ("per-tile loop, batch 1", t_loop), ("forward pass alone", t_fwd)]  # fmt: skip
        if fast is not None:
            rows.insert(1, (f"ours (prepared, compiled, {names[used]})", t["compiled"]))
        for name, secs in rows:
            print(f"  {name:<42}{secs * 1000:>10.1f}{secs / t_ours:>12.2f}x")
        print(f"  speed-up vs MONAI as a user calls it {t_user / t_ours:.2f}x (target >= 1.5), "
              f"vs MONAI in our precision {monai_times[best_b] / t_ours:.2f}x, vs per-tile loop "
              f"{t_loop / t_ours:.2f}x (target >= 3 at width 16), stitching "
              f"overhead {(t_ours - t_fwd) / t_fwd * 100:.1f} % of the forward pass")  # fmt: skip
        if fast is not None:
            t_fast = t["compiled"]
            print(f"  compiled: {compile_s:.1f} s to compile; then vs MONAI "
                  f"{monai_times[best_b] / t_fast:.2f}x, vs per-tile loop {t_loop / t_fast:.2f}x, "
                  f"vs uncompiled {t_ours / t_fast:.2f}x; the compile has paid for itself after "
                  f"{compile_s / max(t_ours - t_fast, 1e-9):.0f} images of this size")  # fmt: skip
        print(
            f"  outputs on a 384x192 crop (same tile offsets): prepared vs MONAI max |diff| "
            f"{diff:.1e}, plain vs MONAI {same:.1e}"
            + (f", compiled vs MONAI {diff_fast:.1e}" if fast is not None else "")
            + "; MONAI by sw_batch: "
            + ", ".join(f"{k}: {v * 1000:.1f} ms" for k, v in monai_times.items())
        )


if __name__ == "__main__":
    main()
