"""Capture overhead: a plain inference loop vs. capturing layers into the store, in one run.

Both sides see the same pre-rendered synthetic images through the same DataLoader settings and
the same model (random weights, eval mode, inference_mode). The capture side writes every
position of ``layer3`` and ``layer4`` as float16 rows into a fresh zarr store (hooks, row
selection, casts, copies, the store's background writer, commits and fsync-free close). The
two are interleaved ``--repeats`` times and the medians compared, since these machines are
noisy. Target: capture <= 1.15x plain inference.

    python benchmarks/capture_overhead.py                   # resnet18, 256 images of 224x224, CPU
    python benchmarks/capture_overhead.py --quick           # a few small images, for the test suite
    python benchmarks/capture_overhead.py --device cuda --model torchvision:resnet50 \\
        --images 4096 --batch-size 256 --autocast bf16      # on a GPU box
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from mechlens.capture import capture_to_store
from mechlens.data import SyntheticShapes
from mechlens.models import load_model

_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def plain_inference(loaded, dataset, batch_size: int, device: torch.device, autocast: str | None,
                    channels_last: bool) -> float:
    """The baseline: the same loader, copies, normalisation and forward, nothing captured."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0,
                        pin_memory=device.type == "cuda")
    start = time.perf_counter()
    with torch.inference_mode():
        for (images,) in loader:
            x = loaded.preprocessing.normalize(images.to(device, non_blocking=True))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if autocast:
                with torch.autocast(device.type, dtype=_AMP[autocast]):
                    loaded.model(x)
            else:
                loaded.model(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="torchvision:resnet18")
    parser.add_argument("--layers", nargs="+", default=["layer3", "layer4"])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", choices=("bf16", "fp16", "none"), default="none")
    parser.add_argument("--quick", action="store_true", help="tiny run for the test suite")
    args = parser.parse_args()
    if args.quick:
        args.images, args.size, args.batch_size, args.repeats = 8, 64, 4, 1

    device = torch.device(args.device)
    autocast = None if args.autocast == "none" else args.autocast
    torch.manual_seed(0)
    loaded = load_model(args.model, input_size=args.size, device=device)
    channels_last = device.type == "cuda"
    if channels_last:
        loaded.model.to(memory_format=torch.channels_last)
    print(f"rendering {args.images} synthetic images of {args.size}x{args.size} ...", flush=True)
    images = SyntheticShapes(num_samples=args.images, image_size=args.size, seed=0).to_tensors()[0]
    dataset = TensorDataset(images)

    # warm-up both paths (allocator, kernels, first-touch of the page cache)
    scratch = Path(tempfile.mkdtemp(prefix="mechlens-capture-bench-"))
    try:
        warm = TensorDataset(images[: args.batch_size])
        plain_inference(loaded, warm, args.batch_size, device, autocast, channels_last)
        capture_to_store(loaded, warm, scratch / "warm", layers=args.layers, dtype="float16",
                         batch_size=args.batch_size, num_workers=0, device=device, autocast=autocast,
                         channels_last=channels_last, progress=False)
        plain_times, capture_times, megabytes, rows = [], [], 0.0, {}
        for repeat in range(args.repeats):
            plain_times.append(plain_inference(loaded, dataset, args.batch_size, device, autocast, channels_last))
            out = scratch / f"run{repeat}"
            start = time.perf_counter()
            result = capture_to_store(loaded, dataset, out, layers=args.layers, dtype="float16",
                                      batch_size=args.batch_size, num_workers=0, device=device,
                                      autocast=autocast, channels_last=channels_last, progress=False)
            capture_times.append(time.perf_counter() - start)
            megabytes, rows = result.bytes_written / 1e6, result.rows
            shutil.rmtree(out)
            print(f"repeat {repeat}: plain {plain_times[-1]:.2f}s, capture {capture_times[-1]:.2f}s "
                  f"({megabytes:.0f} MB, rows {rows})", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    plain, captured = statistics.median(plain_times), statistics.median(capture_times)
    figures = {
        "model": args.model, "device": str(device), "images": args.images, "size": args.size,
        "batch_size": args.batch_size, "autocast": autocast or "none", "layers": args.layers,
        "plain_seconds": round(plain, 3), "capture_seconds": round(captured, 3),
        "plain_images_per_s": round(args.images / plain, 1), "capture_images_per_s": round(args.images / captured, 1),
        "captured_megabytes": round(megabytes, 1), "captured_mb_per_s": round(megabytes / captured, 1),
        "rows": rows, "repeats": args.repeats,
    }
    ratios = {"capture_vs_plain_time": round(captured / plain, 3)}
    print(f"plain inference {figures['plain_images_per_s']} images/s; capture {figures['capture_images_per_s']} "
          f"images/s ({figures['captured_mb_per_s']} MB/s into the store); ratio {ratios['capture_vs_plain_time']} "
          f"(target <= 1.15)")
    print(json.dumps({"benchmark": "capture_overhead", "figures": figures, "ratios": ratios}))


if __name__ == "__main__":
    main()
