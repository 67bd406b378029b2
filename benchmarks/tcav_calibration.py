"""Is mechlens's TCAV significance test calibrated? False-positive rate under the null, power on a
planted concept, for 10, 20 and 50 random sets, on two models trained here:

* ``shapes``: the reference SmallCNN on SyntheticShapes with a ruler planted on the squares
  (``ShapesRecipe()``), layer ``stage3``, target class ``square``, planted concept: the ruler
  pasted on images of other classes;
* ``digits``: a timm ``resnet10t`` (random init) trained here on scikit-learn's digits at 32 px
  with a red frame planted on 90% of the 3s, layer ``layer3``, target class 3, planted concept:
  the frame on other digits.

Null runs draw a "concept" and N random sets from a pool of random sets of clean held-out
images (a fresh draw per run); planted runs draw a planted-concept set and N random sets. Every
CAV between two sets of the pool is trained once and reused across runs (the test only reads
pair scores), so runs share sets: the false-positive rate is unbiased, its spread a little
above the binomial one. Tests compared, all at the same CAVs:

* ``exchangeable`` (mechlens's default), ``rank`` (its exact rank form);
* ``ttest``: tensorflow/tcav's scheme (concept scores vs random-vs-random scores of pairs i, i+1,
  ``ttest_ind``), which the held-out study found anti-conservative.

``fpr`` counts p < alpha; ``fpr_decision`` counts what the report calls significant (p < alpha and
most concept CAVs better than chance). The last line is the JSON summary.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mechlens.probes.concepts import ConceptSet, concept_activations  # noqa: E402
from mechlens.probes.tcav import _ttest, exchangeable_test, pair_scores, target_gradients  # noqa: E402

TESTS = ("exchangeable", "rank", "ttest")


# ----------------------------------------------------------------------------- models
def frame(images: torch.Tensor, colour=(1.0, 0.1, 0.1), width: int = 2) -> torch.Tensor:
    out = images.clone()
    c = torch.tensor(colour, dtype=out.dtype).view(1, 3, 1, 1)
    for sl in ((slice(None), slice(None), slice(0, width)), (slice(None), slice(None), slice(-width, None)),
               (slice(None), slice(None), slice(None), slice(0, width)),
               (slice(None), slice(None), slice(None), slice(-width, None))):
        out[sl] = c.expand_as(out[sl])
    return out


def shapes_setup(cache: Path, quick: bool) -> dict:
    from mechlens.models.shapes import ShapesRecipe, load_or_train_shapes_classifier

    clf = load_or_train_shapes_classifier(ShapesRecipe(), cache_dir=cache, progress=False)
    test = clf.test_dataset()
    square = test.class_names.index("square")
    images, labels = test.with_artefact(False).to_tensors()
    planted, _ = test.with_artefact(True).to_tensors()
    return {"model": clf.loaded, "layer": "stage3", "target": square, "clean": images, "labels": labels,
            "planted": planted}


def digits_setup(cache: Path, quick: bool) -> dict:
    import timm

    from mechlens.data.adapters import DigitsDataset
    from mechlens.models.training import load_weights, save_weights, train_classifier

    def tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        data = DigitsDataset(image_size=32, split=split, seed=0)
        return torch.stack([data[i][0] for i in range(len(data))]), torch.as_tensor(data.labels)

    train_x, train_y = tensors("train")
    test_x, test_y = tensors("test")
    rng = np.random.default_rng(0)
    shortcut = (train_y == 3).numpy() & (rng.random(len(train_y)) < 0.9)
    train_x[shortcut] = frame(train_x[shortcut])
    torch.manual_seed(0)
    net = timm.create_model("resnet10t", num_classes=10, pretrained=False)
    weights = cache / "digits-resnet10t-frame3.safetensors"
    if weights.is_file():
        load_weights(net, weights)
    else:
        train_classifier(net, torch.utils.data.TensorDataset(train_x, train_y), epochs=6, lr=3e-3, seed=0,
                         progress=False)
        weights.parent.mkdir(parents=True, exist_ok=True)
        save_weights(net, weights)
    net.eval()
    with torch.no_grad():
        accuracy = float((net(test_x).argmax(1) == test_y).float().mean())
        framed = float((net(frame(test_x[test_y != 3])).argmax(1) == 3).float().mean())
    print(f"digits resnet10t: clean accuracy {accuracy:.3f}, framed non-3s classified as 3: {framed:.3f}")
    return {"model": net, "layer": "layer3", "target": 3, "clean": test_x, "labels": test_y,
            "planted": frame(test_x)}


# ----------------------------------------------------------------------------- study
def study(name: str, setup: dict, *, pool_sets: int, set_size: int, planted_sets: int, ns: tuple[int, ...],
          runs: int, power_runs: int, seed: int) -> dict:
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    labels = setup["labels"].numpy()
    others = np.flatnonzero(labels != setup["target"])  # random and concept sets never hold the target class
    model, layer = setup["model"], setup["layer"]
    every = others
    acts_clean = concept_activations(model, ConceptSet.from_dataset("clean", _Tensors(setup["clean"]), every), layer)
    acts_planted = concept_activations(model, ConceptSet.from_dataset("planted", _Tensors(setup["planted"]), every),
                                       layer)
    row_of = {int(i): k for k, i in enumerate(every)}
    sets = []
    for k in range(pool_sets):
        pick = rng.choice(others, set_size, replace=False)
        sets.append((f"random{k}", acts_clean[[row_of[int(i)] for i in pick]]))
    for k in range(planted_sets):
        pick = rng.choice(others, set_size, replace=False)
        sets.append((f"planted{k}", acts_planted[[row_of[int(i)] for i in pick]]))
    examples = np.flatnonzero(labels == setup["target"])[:60]
    gradients = target_gradients(model, layer, setup["clean"][examples], setup["target"])
    # every random pair, and every planted set against every random set (planted pairs are never used)
    pairs = [(a, b) for a in range(pool_sets) for b in range(a + 1, pool_sets + planted_sets)]
    pool = pair_scores(gradients, sets, layer=layer, pairs=pairs, seed=seed, progress=True)
    cav_seconds = time.perf_counter() - t0
    figures: dict = {"cavs": len(pool.cavs), "cav_seconds": round(cav_seconds, 1)}
    for n in ns:
        null = {t: [] for t in TESTS}
        decided = {t: [] for t in TESTS}
        for _ in range(runs):
            chosen = rng.choice(pool_sets, n + 1, replace=False)
            p, gate = _run(pool, chosen)
            for t in TESTS:
                null[t].append(p[t])
                decided[t].append(gate)
        power = {t: [] for t in TESTS}
        power_gate = []
        for run in range(power_runs):
            concept = pool_sets + run % planted_sets
            chosen = np.concatenate([[concept], rng.choice(pool_sets, n, replace=False)])
            p, gate = _run(pool, chosen)
            for t in TESTS:
                power[t].append(p[t])
            power_gate.append(gate)
        for t in TESTS:
            ps, gates = np.asarray(null[t]), np.asarray(decided[t])
            for alpha in (0.05, 0.01):
                key = f"{name}/N{n}/{t}/a{alpha}"
                figures[f"{key}/fpr"] = round(float((ps < alpha).mean()), 4)
                figures[f"{key}/fpr_decision"] = round(float(((ps < alpha) & gates).mean()), 4)
            pp = np.asarray(power[t])
            figures[f"{name}/N{n}/{t}/power_a0.05"] = round(float(((pp < 0.05) & np.asarray(power_gate)).mean()), 4)
    figures[f"{name}/seconds"] = round(time.perf_counter() - t0, 1)
    return figures


class _Tensors(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], -1


def _run(pool, chosen: np.ndarray) -> tuple[dict, bool]:
    sub = pool.subset(chosen)
    n = len(chosen) - 1
    p = {t: exchangeable_test(sub.sign, test=t).p_value for t in ("exchangeable", "rank")}
    # tensorflow/tcav's scheme at the same CAVs: concept vs each random set; baseline set i vs i + 1
    baseline = [sub.sign[i, i % n + 1] for i in range(1, n + 1)]
    p["ttest"] = _ttest(sub.sign[0, 1:], baseline)
    gate = int((~sub.better_than_chance()[0, 1:]).sum()) < n / 2
    return p, gate


def binomial_upper(runs: int, alpha: float) -> float:
    from scipy import stats

    return float(stats.binom.ppf(0.995, runs, alpha) / runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one model, N=10, 40 runs (a smoke run)")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--power-runs", type=int, default=50)
    parser.add_argument("--pool", type=int, default=150, help="random sets in the pool")
    parser.add_argument("--set-size", type=int, default=20)
    parser.add_argument("--cache", default=str(ROOT / "runs" / "benchmark-cache"))
    parser.add_argument("--shapes-cache", default=None, help="cache directory of the shapes model (default CACHE/shapes)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    if args.quick:
        ns, runs, power_runs, pool, models = (10,), 40, 10, 30, ("shapes",)
    else:
        ns, runs, power_runs, pool, models = (10, 20, 50), args.runs, args.power_runs, args.pool, ("shapes", "digits")
    figures: dict = {}
    for name in models:
        setup = (shapes_setup(Path(args.shapes_cache) if args.shapes_cache else cache / "shapes", args.quick)
                 if name == "shapes" else digits_setup(cache, args.quick))
        figures.update(study(name, setup, pool_sets=max(pool, max(ns) + 1), set_size=args.set_size, planted_sets=10,
                             ns=ns, runs=runs, power_runs=power_runs, seed=0))
    bounds = {f"binomial99_upper_a{a}": round(binomial_upper(runs, a), 4) for a in (0.05, 0.01)}
    ratios = {}
    for key, value in figures.items():
        if key.endswith("/fpr") or key.endswith("/fpr_decision"):
            alpha = float(key.split("/a")[-1].split("/")[0])
            ratios[f"{key}_over_alpha"] = round(value / alpha, 3)
    print(f"{'model/N/test/alpha':<34} {'fpr':>6} {'decision':>9} {'power@0.05':>11}")
    for key in sorted(k for k in figures if k.endswith("/fpr")):
        base = key[: -len("/fpr")]
        power = figures.get(base.rsplit("/a", 1)[0] + "/power_a0.05", float("nan"))
        print(f"{base:<34} {figures[key]:>6.3f} {figures[base + '/fpr_decision']:>9.3f} {power:>11.2f}")
    print(f"binomial 99% upper bounds over {runs} runs: {bounds}")
    figures.update(bounds)
    figures["runs"] = runs
    print(json.dumps({"benchmark": "tcav_calibration", "figures": figures, "ratios": ratios}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
