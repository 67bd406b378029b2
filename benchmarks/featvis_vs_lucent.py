"""Feature visualization: mechlens ``render`` vs Lucent ``render_vis``, in one run.

Both sides optimize the same thing: torchvision resnet18 with random weights (seeded, eval
mode), channel 17 of ``layer3``, an image of ``--size`` pixels parameterized in Fourier space
with decorrelated colour and a sigmoid (Lucent's ``param.image(size, fft=True,
decorrelate=True)``), Lucent's ``standard_transforms`` (pad 12, jitter 8, random scale
0.9..1.1, random rotation -10..10 degrees, jitter 4; mechlens uses its own pure-torch
equivalents), ImageNet normalization, a final resize to ``--size`` (Lucent's
``fixed_image_size``), Adam with lr 0.05, ``--steps`` steps. Runs alternate between the two
libraries ``--repeats`` times and medians are compared (these machines are noisy). Figures:

* ``s/step`` for one channel, and the ratio mechlens / Lucent (target <= 1.0);
* features per second when 16 channels of ``layer3`` are rendered in one batched optimization
  (``Objective.per_image``) vs one at a time, and the ratio (target >= 4 from batching; a GPU
  target: on a CPU the work grows with the batch, so expect far less there); Lucent's batched
  equivalent (a 16-image param with ``channel(layer, c, batch=c)`` summed) for reference.

    python benchmarks/featvis_vs_lucent.py              # 128 px, 32 steps, 3 repeats, CPU
    python benchmarks/featvis_vs_lucent.py --quick      # tiny run for the test suite
    python benchmarks/featvis_vs_lucent.py --device cuda --size 224 --steps 128

The last line printed is one JSON object: ``{"benchmark": "featvis_vs_lucent", "figures": ..., "ratios": ...}``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import numpy as np
import torch

from mechlens.features import Channel
from mechlens.featvis import Objective, Resize, render, standard_transforms
from mechlens.models import load_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_lucent(model, layer: str, channels: list[int], size: int, steps: int, seed: int, device: torch.device) -> float:
    """Seconds for one Lucent ``render_vis`` (one image per channel; a batch when several)."""
    from lucent.optvis import objectives, param, render, transform

    np.random.seed(seed)
    torch.manual_seed(seed)
    if len(channels) == 1:
        objective = f"{layer}:{channels[0]}"
    else:
        objective = objectives.Objective.sum([objectives.channel(layer, c, batch=i) for i, c in enumerate(channels)])
    start = time.perf_counter()
    render.render_vis(
        model, objective, param_f=lambda: param.image(size, batch=len(channels), fft=True, decorrelate=True),
        transforms=list(transform.standard_transforms), thresholds=(steps,), show_image=False, progress=False,
        fixed_image_size=size,
    )
    _sync(device)
    return time.perf_counter() - start


def run_mechlens(loaded, layer: str, channels: list[int], size: int, steps: int, seed: int) -> float:
    """Seconds for one mechlens ``render`` (one image per channel, batched)."""
    features = [Channel(layer, c) for c in channels]
    objective = Objective(features[0]) if len(features) == 1 else Objective.per_image(features)
    start = time.perf_counter()
    render(loaded, objective, size=size, steps=steps, param="fft", decorrelate="svd",
           transforms=standard_transforms() + [Resize(size)], lr=0.05, seed=seed)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", default="layer3")
    parser.add_argument("--channel", type=int, default=17)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32, help="steps of the one-channel comparison")
    parser.add_argument("--batch", type=int, default=16, help="features rendered together in the batching comparison")
    parser.add_argument("--batch-steps", type=int, default=8, help="steps of each render in the batching comparison")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-lucent-batch", action="store_true", help="skip Lucent's batched reference run")
    parser.add_argument("--quick", action="store_true", help="tiny run for the test suite")
    args = parser.parse_args()
    if args.quick:
        args.size, args.steps, args.batch_steps, args.repeats = 64, 3, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # kornia / torch.jit deprecation chatter from Lucent

    device = torch.device(args.device)
    torch.manual_seed(0)  # torchvision initializes the random weights from the global generator
    loaded = load_model("torchvision:resnet18", device=device)
    model = loaded.model.eval()
    for p in model.parameters():
        p.requires_grad_(True)  # as a user would hand it to either library
    layer, channel, size = args.layer, args.channel, args.size
    channels = list(range(args.batch))

    # warm-up: imports (Adam pulls in torch._dynamo), allocator, kernels
    run_lucent(model, layer, [channel], size, 1, 0, device)
    run_mechlens(loaded, layer, [channel], size, 1, 0)

    lucent_times, mech_times = [], []
    for repeat in range(args.repeats):
        lucent_times.append(run_lucent(model, layer, [channel], size, args.steps, repeat, device))
        mech_times.append(run_mechlens(loaded, layer, [channel], size, args.steps, repeat))
        print(f"repeat {repeat}: lucent {lucent_times[-1] / args.steps:.4f} s/step, "
              f"mechlens {mech_times[-1] / args.steps:.4f} s/step", flush=True)
    lucent_step = statistics.median(lucent_times) / args.steps
    mech_step = statistics.median(mech_times) / args.steps

    batched_times, sequential_times, lucent_batched_times = [], [], []
    for repeat in range(args.repeats):
        batched_times.append(run_mechlens(loaded, layer, channels, size, args.batch_steps, repeat))
        sequential_times.append(sum(run_mechlens(loaded, layer, [c], size, args.batch_steps, repeat) for c in channels))
        if not args.no_lucent_batch:
            lucent_batched_times.append(run_lucent(model, layer, channels, size, args.batch_steps, repeat, device))
        print(f"repeat {repeat}: {args.batch} features batched {batched_times[-1]:.2f}s, one at a time "
              f"{sequential_times[-1]:.2f}s" + (f", lucent batched {lucent_batched_times[-1]:.2f}s"
                                                if lucent_batched_times else ""), flush=True)
    batched_fps = args.batch / statistics.median(batched_times)
    sequential_fps = args.batch / statistics.median(sequential_times)

    figures = {
        "model": "torchvision:resnet18 (random weights)", "device": str(device), "threads": torch.get_num_threads(),
        "layer": layer, "channel": channel, "size": size, "steps": args.steps, "repeats": args.repeats,
        "lucent_s_per_step": round(lucent_step, 5), "mechlens_s_per_step": round(mech_step, 5),
        "batch": args.batch, "batch_steps": args.batch_steps,
        "mechlens_batched_features_per_s": round(batched_fps, 3),
        "mechlens_one_at_a_time_features_per_s": round(sequential_fps, 3),
    }
    ratios = {
        "mechlens_vs_lucent_time_per_step": round(mech_step / lucent_step, 3),
        "batched_vs_one_at_a_time_throughput": round(batched_fps / sequential_fps, 3),
    }
    if lucent_batched_times:
        lucent_fps = args.batch / statistics.median(lucent_batched_times)
        figures["lucent_batched_features_per_s"] = round(lucent_fps, 3)
        ratios["mechlens_vs_lucent_batched_throughput"] = round(batched_fps / lucent_fps, 3)
    print(f"one channel: mechlens {mech_step:.4f} s/step, lucent {lucent_step:.4f} s/step, ratio "
          f"{ratios['mechlens_vs_lucent_time_per_step']} (target <= 1.0); {args.batch} features: batched "
          f"{batched_fps:.2f} features/s vs one at a time {sequential_fps:.2f} features/s, ratio "
          f"{ratios['batched_vs_one_at_a_time_throughput']} (target >= 4, on a GPU)")
    print(json.dumps({"benchmark": "featvis_vs_lucent", "figures": figures, "ratios": ratios}))


if __name__ == "__main__":
    main()
