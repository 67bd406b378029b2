"""SAE training: mechlens against SAELens, dictionary_learning and overcomplete, TopK and BatchTopK,
on captured conv activations and on a planted dictionary.

Data (``--data conv|planted|both``), each in three stores (train / validation / test):

* ``conv``: the per-position rows of ``stage2`` (64 channels, 8x8 positions) of a SmallCNN on
  SyntheticShapes (random init with ``--quick``, one epoch of training otherwise); each split is
  captured from its own images.
* ``planted``: rows ``codes @ atoms`` of ``planted_dictionary(n_atoms=512, d=128, active=8,
  seed=0)`` (8 of 512 random unit atoms per row, exponential magnitudes), each split drawn with
  its own seeds. The rows are written to a store like captured ones, so mechlens is measured on
  its real path (``train_sae`` on a store layer), and every decoder is scored against the atoms.

Architectures (``--arch topk|batchtopk|both``): every system gets the same width, k, batch size
and number of steps, and every peer the same batches in the same order (``steps`` shuffled
batches of the train rows, held in memory on the run device). Each system runs its own recipe
(initialisation, normalisation, loss, schedule, AuxK) with its library's defaults, except for
the two settings that size a run to its data, set alike for every recipe that has them: the
dead-latent window (``--dead-window`` rows; default max(4 batches, half the train rows)) and the
LR warm-up (mechlens's default, 1% of the steps). How each system is driven:

* ``mechlens``: ``train_sae(store, layer, TopKConfig | BatchTopKConfig, TrainConfig)``, streaming
  shuffled batches from the train store (normalisation from the store statistics,
  geometric-median ``b_dec``, ``W_enc = W_dec^T``, unit-norm decoder with parallel-gradient
  removal, AuxK against dead latents, warm-up and linear decay). BatchTopK is scored with its
  inference threshold (eval mode).
* ``saelens`` (SAELens 6): its ``TopKTrainingSAE`` / ``BatchTopKTrainingSAE`` and their own loss
  (``training_forward_pass``: MSE + TopK AuxK at ``aux_loss_coefficient`` 1;
  ``rescale_acts_by_decoder_norm``, decoder init norm 0.1), trained by its real ``SAETrainer``
  whose ``data_provider`` iterates the batches (its ``expected_average_only_in`` norm estimate
  first reads ``min(100, steps)`` of them; then training starts from the first batch); its
  default constant LR. The trained SAE goes through ``save_inference_model`` /
  ``SAE.load_from_disk``, so BatchTopK is scored as the JumpReLU SAE (global threshold) that
  SAELens exports.
* ``dictionary_learning``: ``trainSAE(data=batches, trainer_configs=[TopKTrainer |
  BatchTopKTrainer config], normalize_activations=True)`` (its geometric-median ``b_dec``,
  unit-norm decoder, normalised AuxK at 1/32, warm-up, threshold from ``threshold_start_step``
  = the warm-up); its trainers fix the dead window at 10M tokens, so a subclass sets it to the
  shared window. TopK is scored with top-k per row, BatchTopK with its threshold (``encode``'s
  defaults).
* ``overcomplete``: ``TopKSAE`` / ``BatchTopKSAE`` (encoder Linear + BatchNorm; BatchTopK keeps
  ``k * batch`` activations per batch) trained by its ``train_sae`` loop with its AuxK loss
  ``top_k_auxiliary_loss`` (no data normalisation, LR schedule or dead tracking there);
  BatchTopK scored in eval mode (its running threshold).

A peer that is not installed (they are dev extras) is null in the figures, with a note.

Learning rate: every system is trained at every rate of ``--lr-sweep`` (rates outer, systems
inner, so a burst of load elsewhere on the machine hits every system alike); per data x arch x
system the rate of lowest validation FVU is chosen, and that SAE is scored on the test split. A
system is one :class:`System` entry, ``train(run) -> Trained`` (encode / decode and decoder
rows), so a mechlens variant is one more entry of :func:`systems`, chosen with ``--systems``
(``mechlens_in_memory``, ``mechlens_multik`` and ``mechlens_auto_lr``, a system that finds its
own rate, are there already).

Figures per data x arch x system, every SAE scored by the same code (``mechlens.sae.evaluate``
on the test rows, through encode / decode): FVU at matched L0 (``FVU@k``; TopK keeps k per row for every
system; for BatchTopK every SAE is converted exactly into a mechlens SAE by ``from_peer`` and its
inference threshold is set so that the mean L0 on the test rows is k, the same procedure
for all, since each library's own running threshold lands elsewhere after a short run), and
beside it the FVU and L0 with each library's own inference threshold; dead % (latents that never fire on the test rows, at matched L0); MMCS on planted data (mean over
the atoms of the largest cosine with a decoder row, ``mechlens.sae.compare.mmcs``); training
rows/s (``steps * batch`` over the wall-clock of the whole training call: set-up, initialisation,
loop, export; the median over the rates of the sweep, after one untimed 5-step warm-up run per
system); and peak memory, from a separate run of ``--memory-steps`` steps at the chosen rate with
a dead window of one batch (so AuxK is active): on CUDA ``torch.cuda.max_memory_allocated``
above what was allocated before; on CPU the peak of torch's CPU tensor allocations on the
training thread (the profiler's memory events; ``tracemalloc`` does not see torch tensors) plus
the ``tracemalloc`` peak (Python / numpy). The peers' batches are already in memory and not counted; mechlens's
store-streaming buffers are. Ratios per data x arch for every mechlens entry: FVU and L0 / those
of the best peer (lowest test FVU), dead % minus the best peer's and minus the fewest of any
peer, rows/s / each peer's. Prints tables, then one JSON line ``{"benchmark": "sae_vs_peers",
"figures": ..., "ratios": ...}``.

    python benchmarks/sae_vs_peers.py --threads 1              # 2000 images / 2^18 planted rows, 2000 steps
    python benchmarks/sae_vs_peers.py --quick --threads 1      # tiny, for the test suite (~2 min)
    python benchmarks/sae_vs_peers.py --device cuda --data planted --arch batchtopk
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib.util
import io
import itertools
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("TQDM_DISABLE", "1")  # the peers' own progress bars (SAELens, dictionary_learning)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# overcomplete 0.3 calls matplotlib.cm.get_cmap, removed in matplotlib 3.9: restore the alias
# before importing it (only its plotting helpers use it; the SAE code does not).
import matplotlib  # noqa: E402
import matplotlib.cm as cm  # noqa: E402

if not hasattr(cm, "get_cmap"):
    cm.get_cmap = matplotlib.colormaps.get_cmap

from activation_store import ActivationStore, LayerSpec, StoreWriter  # noqa: E402
from mechlens.capture import capture  # noqa: E402
from mechlens.data.synthetic import SyntheticShapes, SyntheticShapesConfig  # noqa: E402
from mechlens.features.layout import as_position_rows  # noqa: E402
from mechlens.models import small_cnn, train_classifier  # noqa: E402
from mechlens.sae import (  # noqa: E402
    BatchTopKConfig, Normalizer, SAETrainer, TensorSource, TopKConfig, TrainConfig, evaluate, from_peer, train_sae,
)
from mechlens.sae.synthetic import planted_dictionary  # noqa: E402
from mechlens.sae.training import member_lr  # noqa: E402

try:  # the shared definition, once mechlens has one
    from mechlens.sae.compare import mmcs as _shared_mmcs  # noqa: E402
except ImportError:
    _shared_mmcs = None

ARCHS = ("topk", "batchtopk")
DATA_KINDS = ("conv", "planted")
CONV_LAYER = "stage2"
PLANTED_LAYER = "planted"
EVAL_BATCH = 4096


# ---------------------------------------------------------------------------- data
@dataclass
class Data:
    """One kind of data: train / validation / test stores of one layer, and the batches the peers
    train on (``steps`` shuffled batches of the train rows, on the run device)."""

    kind: str
    layer: str
    stores: dict[str, ActivationStore]
    batches: list[torch.Tensor]
    atoms: torch.Tensor | None = None  # the planted atoms [n_atoms, d] (planted data only)
    description: str = ""

    @property
    def d(self) -> int:
        return self.stores["train"][self.layer].dim

    def rows(self, split: str) -> int:
        return self.stores[split][self.layer].num_rows

    def eval_batches(self, split: str) -> list[Any]:
        return list(self.stores[split][self.layer].iter_batches(EVAL_BATCH, shuffle=False))


def capture_rows(path: Path, model: torch.nn.Module, dataset: SyntheticShapes, *, layer: str = CONV_LAYER,
                 batch_size: int = 200, dtype: str = "float16") -> ActivationStore:
    """Per-position rows of ``layer`` for every image into a new store (sample id, position, label)."""
    model.eval()
    writer = None
    try:
        for start in range(0, len(dataset), batch_size):
            ids = np.arange(start, min(start + batch_size, len(dataset)))
            images = dataset.render(ids)
            with torch.no_grad(), capture(model, [layer]) as cap:
                model(images)
            rows, spatial = as_position_rows(cap[layer], "nchw")  # a conv stage of the shapes CNN
            b, p, c = rows.shape
            if writer is None:
                meta = {"spatial": "all", "layout": "nchw", "spatial_shape": list(spatial)}
                writer = StoreWriter(path, model="mechlens:small_cnn", layers={layer: LayerSpec(c, dtype, meta=meta)})
            writer.write({layer: rows.reshape(b * p, c).numpy().astype(dtype)}, sample_ids=np.repeat(ids, p),
                         positions=np.tile(np.arange(p), b), labels=np.repeat(dataset.labels[ids], p))
    finally:
        if writer is not None:
            writer.close()
    return ActivationStore(path)


def write_planted_rows(path: Path, planted: Any, rows: int, *, seed: int, chunk: int = 16_384) -> ActivationStore:
    """``rows`` rows drawn from ``planted`` (chunk ``i`` with seed ``1000 * seed + i``) into a new store."""
    meta = {"spatial": "all", "source": "planted_dictionary"}
    with StoreWriter(path, model="planted_dictionary",
                     layers={PLANTED_LAYER: LayerSpec(planted.d, "float32", meta=meta)}) as writer:
        for index, start in enumerate(range(0, rows, chunk)):
            n = min(chunk, rows - start)
            x, _ = planted.sample(n, seed=1000 * seed + index)
            ids = np.arange(start, start + n)
            writer.write({PLANTED_LAYER: x.numpy()}, sample_ids=ids, positions=np.zeros(n, dtype=np.int64))
    return ActivationStore(path)


def peer_batches(store: ActivationStore, layer: str, args: argparse.Namespace) -> list[torch.Tensor]:
    """The batches every peer trains on: the train rows in memory, shuffled per epoch (seeded)."""
    memory = torch.from_numpy(store[layer][:]).float()
    source = TensorSource(memory, args.batch_size, seed=args.seed)
    return [b.data.to(args.device) for _, b in zip(range(args.steps), source.iterate(0))]


def conv_data(args: argparse.Namespace, scratch: Path) -> Data:
    train_images = SyntheticShapes(SyntheticShapesConfig(num_samples=args.images, image_size=64, split="train"))
    test_images = SyntheticShapes(SyntheticShapesConfig(num_samples=max(100, args.images // 4), image_size=64,
                                                        split="test"))
    val_images = SyntheticShapes(test_images.config.replace(split="validation"))
    model = small_cnn(num_classes=5, seed=0)
    if not args.quick:
        start = time.perf_counter()
        train_classifier(model, train_images, epochs=1, batch_size=64, progress=False)
        print(f"  trained the CNN for one epoch in {time.perf_counter() - start:.0f} s", flush=True)
    stores = {split: capture_rows(scratch / f"conv-{split}", model, images)
              for split, images in (("train", train_images), ("validation", val_images), ("test", test_images))}
    stores["train"].statistics(CONV_LAYER)  # cached in the store, as after a capture job
    return Data("conv", CONV_LAYER, stores, peer_batches(stores["train"], CONV_LAYER, args),
                description=f"{CONV_LAYER} of small_cnn on {args.images} SyntheticShapes images")


def planted_data(args: argparse.Namespace, scratch: Path) -> Data:
    planted = planted_dictionary(n_atoms=512, d=128, active=8, seed=0)
    held_out = max(8192, args.planted_rows // 8)
    stores = {split: write_planted_rows(scratch / f"planted-{split}", planted, rows, seed=seed)
              for split, rows, seed in (("train", args.planted_rows, 1), ("validation", held_out, 2),
                                        ("test", held_out, 3))}
    stores["train"].statistics(PLANTED_LAYER)
    return Data("planted", PLANTED_LAYER, stores, peer_batches(stores["train"], PLANTED_LAYER, args),
                atoms=planted.atoms, description="planted_dictionary(n_atoms=512, d=128, active=8, seed=0)")


# ---------------------------------------------------------------------------- systems
@dataclass(frozen=True)
class Run:
    """What a system is given for one training run (the same for every system)."""

    data: Data
    arch: str
    width: int
    k: int
    batch_size: int
    steps: int
    lr: float | None  # None for a system that chooses its own rate (System.uses_lr=False)
    seed: int
    device: str
    dead_window: int  # rows without firing after which a latent is dead (the AuxK terms)
    scratch: Path

    @property
    def batches(self) -> list[torch.Tensor]:
        return self.data.batches[:self.steps]

    @property
    def warmup_steps(self) -> int:
        """The LR warm-up of the recipes that count it in steps (dictionary_learning, also its
        threshold start): as long as mechlens's default (a fraction of the steps)."""
        return max(1, round(TrainConfig().lr_warmup_fraction * self.steps))


@dataclass
class Trained:
    """A trained SAE as the scorer sees it: raw rows -> latents -> reconstructions, and its
    decoder directions ``[width, d_in]`` (for MMCS). ``lr``: the rate it trained at, when the
    system chose it itself."""

    encode: Callable[[torch.Tensor], torch.Tensor]
    decode: Callable[[torch.Tensor], torch.Tensor]
    decoder_rows: torch.Tensor
    lr: float | None = None
    as_mechlens: Callable[[], Any] | None = None  # the same SAE as a mechlens SAE (mechlens.sae.from_peer)


@dataclass(frozen=True)
class System:
    """One entry of the comparison. ``ours``: a mechlens entry (compared with every peer);
    ``uses_lr``: trained at every rate of the sweep (False: once, it finds its own rate)."""

    name: str
    train: Callable[[Run], Trained]
    ours: bool = False
    archs: tuple[str, ...] = ARCHS
    uses_lr: bool = True
    how: str = ""
    requires: str = ""  # the module it needs (a dev extra): without it, the entry is null

    def available(self) -> bool:
        return not self.requires or importlib.util.find_spec(self.requires) is not None


def _mechlens_configs(run: Run, sae_options: dict[str, Any], train_options: dict[str, Any]
                      ) -> tuple[TopKConfig, TrainConfig]:
    config_class = TopKConfig if run.arch == "topk" else BatchTopKConfig
    config = config_class(width=run.width, k=run.k, **sae_options)
    options = {"steps": run.steps, "batch_size": run.batch_size, "lr": run.lr, "device": run.device, "seed": run.seed,
               "dead_window": run.dead_window, "log_every": max(1, run.steps // 5), **train_options}
    return config, TrainConfig(**options)  # its default warm-up: the run's warmup_steps


def mechlens_system(name: str = "mechlens", *, sae: Callable[[Run], dict[str, Any]] | None = None,
                    train: Callable[[Run], dict[str, Any]] | None = None, in_memory: bool = False,
                    uses_lr: bool = True, how: str = "") -> System:
    """A mechlens entry: ``train_sae`` on the train store, with extra ``TopKConfig`` / ``TrainConfig``
    options (functions of the run, e.g. ``lambda run: {"lr": "auto"}`` with ``uses_lr=False``);
    ``in_memory``: ``SAETrainer.fit`` on the peers' batches instead."""

    def fit(run: Run) -> Trained:
        config, train_config = _mechlens_configs(run, sae(run) if sae else {}, train(run) if train else {})
        store = run.data.stores["train"]
        if in_memory:
            normalizer = Normalizer.from_statistics(store.statistics(run.data.layer), center=train_config.center)
            config = config.replace(d_in=run.data.d, layer=run.data.layer)
            result = SAETrainer(config, train_config).fit(run.batches, progress=False, normalizer=normalizer)
        else:
            result = train_sae(store, run.data.layer, config, train_config, progress=False)
        model = result.sae
        return Trained(model.encode, model.decode, model.W_dec.detach(), lr=member_lr(model.config, train_config),
                       as_mechlens=lambda: copy.deepcopy(model))

    return System(name, fit, ours=True, uses_lr=uses_lr,
                  how=how or ("SAETrainer.fit on the in-memory batches" if in_memory else "train_sae on the train store"))


def train_saelens(run: Run) -> Trained:
    from sae_lens import SAE as LensSAE
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer as LensTrainer

    sae_class, config_class = {"topk": (TopKTrainingSAE, TopKTrainingSAEConfig),
                               "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig)}[run.arch]
    torch.manual_seed(run.seed)  # SAELens initialises from the global RNG
    sae = sae_class(config_class(d_in=run.data.d, d_sae=run.width, k=run.k, device=run.device,
                                 normalize_activations="expected_average_only_in"))
    norm_batches = min(100, run.steps)
    config = SAETrainerConfig(total_training_samples=run.steps * run.batch_size,
                              train_batch_size_samples=run.batch_size, lr=run.lr, lr_end=run.lr / 10,
                              device=run.device, dead_feature_window=max(1, math.ceil(run.dead_window / run.batch_size)),
                              n_batches_for_norm_estimate=norm_batches)
    provider = itertools.chain(run.batches[:norm_batches], run.batches)  # the norm estimate, then training
    LensTrainer(config, sae, data_provider=provider).fit()
    path = Path(tempfile.mkdtemp(prefix="saelens-", dir=run.scratch))
    try:  # the inference SAE SAELens exports (BatchTopK: a JumpReLU SAE with the global threshold)
        sae.save_inference_model(path)
        model = LensSAE.load_from_disk(str(path), device=run.device).eval()
    finally:
        shutil.rmtree(path, ignore_errors=True)
    return Trained(model.encode, model.decode, model.W_dec.detach(), as_mechlens=lambda: from_peer(model))


class _Copies:
    """Re-iterable batches handed out as copies: ``trainSAE`` iterates its data twice (the
    normalisation factor, then training) and divides each batch in place."""

    def __init__(self, batches: list[torch.Tensor]):
        self.batches = batches

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (b.clone() for b in self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def train_dictionary_learning(run: Run) -> Trained:
    from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
    from dictionary_learning.trainers.top_k import TopKTrainer
    from dictionary_learning.training import trainSAE

    made = []

    class Trainer(TopKTrainer if run.arch == "topk" else BatchTopKTrainer):  # type: ignore[misc, valid-type]
        """The library's trainer; only the dead window (fixed at 10M tokens there) is set."""

        def __init__(self, **options: Any):
            super().__init__(**options)
            self.dead_feature_threshold = run.dead_window
            made.append(self)

    config = {"trainer": Trainer, "steps": run.steps, "activation_dim": run.data.d, "dict_size": run.width,
              "k": run.k, "layer": 0, "lm_name": "sae_vs_peers", "lr": run.lr, "warmup_steps": run.warmup_steps,
              "threshold_start_step": run.warmup_steps, "seed": run.seed, "device": run.device}
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its normalisation factor
        trainSAE(data=_Copies(run.batches), trainer_configs=[config], steps=run.steps, normalize_activations=True,
                 device=run.device)
    model = made[0].ae.eval()  # biases scaled back: it reads raw activations
    # TopK: top-k per row (encode's default); BatchTopK: encode's default, the inference threshold
    return Trained(model.encode, model.decode, model.decoder.weight.detach().T, as_mechlens=lambda: from_peer(model))


def train_overcomplete(run: Run) -> Trained:
    from overcomplete.sae import BatchTopKSAE, TopKSAE, train_sae as oc_train_sae
    from overcomplete.sae.losses import top_k_auxiliary_loss

    torch.manual_seed(run.seed)  # overcomplete initialises from the global RNG
    if run.arch == "topk":
        model = TopKSAE(run.data.d, run.width, top_k=run.k, device=run.device)
    else:  # its top_k counts the activations kept in the whole batch
        model = BatchTopKSAE(run.data.d, run.width, top_k=run.k * run.batch_size, device=run.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=run.lr)
    oc_train_sae(model, run.batches, top_k_auxiliary_loss, optimizer, nb_epochs=1, clip_grad=1.0, monitoring=0,
                 device=run.device)
    model.eval()  # BatchTopK: the running threshold
    return Trained(lambda x: model.encode(x)[1], model.decode, model.get_dictionary().detach(),
                   as_mechlens=lambda: from_peer(model))


def systems() -> dict[str, System]:
    """Every known entry; ``--systems`` picks among them (default: mechlens and the three peers)."""
    entries = [
        mechlens_system(),
        System("saelens", train_saelens, requires="sae_lens", how="its TopK/BatchTopK training SAE and loss, driven by its SAETrainer "
                                             "(data_provider = the batches), exported for inference"),
        System("dictionary_learning", train_dictionary_learning, requires="dictionary_learning",
               how="trainSAE(data=batches, trainer_configs=[TopKTrainer / BatchTopKTrainer])"),
        System("overcomplete", train_overcomplete, requires="overcomplete", how="TopKSAE / BatchTopKSAE with its train_sae loop and AuxK loss"),
        # mechlens variants (not run by default)
        mechlens_system("mechlens_in_memory", in_memory=True),
        mechlens_system("mechlens_multik", sae=lambda run: {"multi_k": 4 * run.k},
                        how="train_sae with the Multi-TopK term (k and 4k)"),
        mechlens_system("mechlens_rescaled", sae=lambda run: {"rescale_acts_by_decoder_norm": True,
                                                               "normalize_decoder": False},
                        how="train_sae with rescale_acts_by_decoder_norm (SAELens's decoder parameterisation)"),
        mechlens_system("mechlens_auto_lr", train=lambda run: {"lr": "auto"}, uses_lr=False,
                        how='train_sae with lr="auto" (its own range test on a validation split of the train store)'),
        mechlens_system("mechlens_rule_lr", train=lambda run: {"lr": "rule"}, uses_lr=False,
                        how='train_sae with lr="rule" (the default: lr_rule of the width)'),
    ]
    return {entry.name: entry for entry in entries}


DEFAULT_SYSTEMS = ("mechlens", "saelens", "dictionary_learning", "overcomplete")


# ---------------------------------------------------------------------------- measurement
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(system: System, run: Run) -> tuple[Trained, float]:
    device = torch.device(run.device)
    _sync(device)
    start = time.perf_counter()
    trained = system.train(run)
    _sync(device)
    return trained, time.perf_counter() - start


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null: the profiler's C++ side logs every start and stop there."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(system: System, run: Run) -> float:
    """Peak bytes a training run allocates above what was allocated when it started (see the
    module docstring for what is counted on CPU and on CUDA)."""
    device = torch.device(run.device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        system.train(run)
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    tracemalloc.start()
    try:
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            system.train(run)
        python_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    running = torch_peak = 0
    for event in events:  # allocations are positive, frees negative
        running += event.nbytes()
        torch_peak = max(torch_peak, running)
    return float(torch_peak + python_peak)


def mmcs(decoder_rows: torch.Tensor, atoms: torch.Tensor) -> float:
    """Mean over the planted atoms of the largest (signed) cosine with any decoder row (1: all
    recovered): ``mechlens.sae.compare.mmcs`` where it exists, else the same computed here."""
    decoder = decoder_rows.detach().float().cpu()
    if _shared_mmcs is not None:
        return float(_shared_mmcs(decoder, atoms))
    return float((F.normalize(atoms.float(), dim=1) @ F.normalize(decoder, dim=1).T).max(dim=1).values.mean())


def matched_l0(trained: Trained, test: list[Any], k: int, device: str) -> Any:
    """BatchTopK at matched L0: the same SAE (as a mechlens SAE, converted exactly by
    ``from_peer``) with its inference threshold set so that the mean L0 on the test rows is ``k``
    (``BatchTopKSAE.calibrate_threshold``: what BatchTopK keeps from one batch of all these rows),
    and scored on them. One scalar fixed to match L0, not to lower FVU, by the same procedure for
    every system, so the FVUs compare at one L0 whatever threshold each library's own training
    left."""
    sae = trained.as_mechlens()
    if not hasattr(sae, "calibrate_threshold"):
        raise TypeError(f"{type(sae).__name__} has no inference threshold to calibrate")
    sae = sae.to(device).eval()
    sae.calibrate_threshold(test, l0=k)
    return evaluate(sae, test, device=device)


# ---------------------------------------------------------------------------- one comparison
def compare(data: Data, arch: str, entries: list[System], args: argparse.Namespace,
            scratch: Path) -> dict[str, dict[str, Any] | None]:
    """Train every entry at every rate, choose each one's rate on validation, score on test."""
    train_rows = data.rows("train")
    k = args.planted_k if data.atoms is not None else args.k
    base = Run(data, arch, args.width, k, args.batch_size, args.steps, None, args.seed, args.device,
               dead_window=args.dead_window or max(4 * args.batch_size, train_rows // 2), scratch=scratch)
    runnable = [s for s in entries if arch in s.archs and s.available()]
    for system in runnable:  # untimed: imports, first-call set-up and allocations out of the timings
        system.train(dataclasses.replace(base, lr=args.lr_sweep[0] if system.uses_lr else None,
                                         steps=min(5, args.steps)))
    validation = data.eval_batches("validation")
    sweep: dict[str, dict[str, float]] = {s.name: {} for s in runnable}
    seconds: dict[str, list[float]] = {s.name: [] for s in runnable}
    best: dict[str, tuple[float, float | None, Trained]] = {}
    for position, lr in enumerate(args.lr_sweep):
        line = []
        for system in runnable:
            if not system.uses_lr and position > 0:
                continue
            trained, took = timed(system, dataclasses.replace(base, lr=lr if system.uses_lr else None))
            fvu = evaluate(trained, validation, device=args.device).fvu
            chosen_lr = lr if system.uses_lr else trained.lr
            sweep[system.name][f"{chosen_lr:g}" if chosen_lr is not None else "own"] = round(fvu, 5)
            seconds[system.name].append(took)
            if system.name not in best or not fvu >= best[system.name][0]:  # NaN never wins
                best[system.name] = (fvu, chosen_lr, trained)
            line.append(f"{system.name} {fvu:.4f} ({took:.1f} s)")
        print(f"    lr {lr:g}: validation FVU  " + " | ".join(line), flush=True)
    test = data.eval_batches("test")
    results: dict[str, dict[str, Any] | None] = {s.name: None for s in entries}
    for system in runnable:
        fvu_val, lr, trained = best[system.name]
        metrics = evaluate(trained, test, device=args.device)
        probe = dataclasses.replace(base, lr=lr if system.uses_lr else None, steps=min(args.memory_steps, args.steps),
                                    dead_window=args.batch_size)
        rate = args.steps * args.batch_size / statistics.median(seconds[system.name])
        matched = matched_l0(trained, test, k, args.device) if arch == "batchtopk" else metrics
        results[system.name] = {
            "fvu_at_k": round(matched.fvu, 5), "l0_at_k": round(matched.l0, 3),
            "dead_pct_at_k": round(100 * matched.dead_fraction, 2),
            "lr": lr, "validation_fvu": round(fvu_val, 5), "validation_fvu_by_lr": sweep[system.name],
            "fvu": round(metrics.fvu, 5), "l0": round(metrics.l0, 3), "dead_pct": round(100 * metrics.dead_fraction, 2),
            "mmcs": round(mmcs(trained.decoder_rows, data.atoms), 4) if data.atoms is not None else None,
            "rows_per_s": round(rate, 1), "train_seconds": [round(s, 3) for s in seconds[system.name]],
            "peak_memory_mib": round(peak_memory(system, probe) / 2 ** 20, 2),
        }
    return results


def ratios_of(kind: str, arch: str, results: dict[str, dict[str, Any] | None],
              entries: list[System]) -> tuple[dict[str, float], str | None]:
    """Every mechlens entry against the peers; and the best peer (lowest test FVU)."""
    peers = {s.name: results[s.name] for s in entries if not s.ours and results[s.name] is not None}
    ratios: dict[str, float] = {}
    if not peers:
        return ratios, None
    # FVU at matched L0: TopK keeps k per row for everyone; BatchTopK thresholds are calibrated to k
    best_name = min(peers, key=lambda name: peers[name]["fvu_at_k"])
    fewest_dead = min(peer["dead_pct_at_k"] for peer in peers.values())
    for system in entries:
        ours = results[system.name]
        if not system.ours or ours is None:
            continue
        prefix = f"{kind}_{arch}_" + ("" if system.name == "mechlens" else f"{system.name}_")
        best = peers[best_name]
        ratios[prefix + "fvu_vs_best_peer"] = round(ours["fvu_at_k"] / max(best["fvu_at_k"], 1e-12), 4)
        ratios[prefix + "own_threshold_fvu_vs_best_peer"] = round(ours["fvu"] / max(best["fvu"], 1e-12), 4)
        ratios[prefix + "own_threshold_l0_vs_best_peer"] = round(ours["l0"] / max(best["l0"], 1e-12), 4)
        ratios[prefix + "dead_pct_minus_best_peer"] = round(ours["dead_pct_at_k"] - best["dead_pct_at_k"], 2)
        ratios[prefix + "dead_pct_minus_fewest_dead_peer"] = round(ours["dead_pct_at_k"] - fewest_dead, 2)
        for name, peer in peers.items():
            ratios[prefix + f"rows_per_s_vs_{name}"] = round(ours["rows_per_s"] / peer["rows_per_s"], 3)
        swept = results.get("mechlens")
        if system.name != "mechlens" and swept is not None:  # a variant (e.g. its own rate) against the sweep's best
            ratios[prefix + "fvu_vs_mechlens_sweep"] = round(ours["fvu_at_k"] / max(swept["fvu_at_k"], 1e-12), 4)
    return ratios, best_name


def print_table(kind: str, arch: str, results: dict[str, dict[str, Any] | None], memory: str) -> None:
    print(f"\n{kind} / {arch}" + " " * max(1, 44 - len(kind) - len(arch)) + f"peak memory: {memory}")
    print(f"{'system':<22}{'lr':>8}{'val FVU':>9}{'FVU@k':>9}{'dead %':>8}{'own FVU':>9}{'own L0':>8}{'MMCS':>8}"
          f"{'rows/s':>11}{'MiB':>9}")
    for name, r in results.items():
        if r is None:
            print(f"{name:<22}  (null: not installed, or cannot train {arch})")
            continue
        lr = f"{r['lr']:.0e}" if r["lr"] is not None else "own"
        mmcs_text = f"{r['mmcs']:.3f}" if r["mmcs"] is not None else "-"
        print(f"{name:<22}{lr:>8}{r['validation_fvu']:>9.4f}{r['fvu_at_k']:>9.4f}{r['dead_pct_at_k']:>8.1f}"
              f"{r['fvu']:>9.4f}{r['l0']:>8.2f}{mmcs_text:>8}{r['rows_per_s']:>11,.0f}{r['peak_memory_mib']:>9.1f}")


# ---------------------------------------------------------------------------- main
def main() -> None:
    known = systems()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (for the test suite)")
    parser.add_argument("--data", choices=(*DATA_KINDS, "both"), default="both")
    parser.add_argument("--arch", choices=(*ARCHS, "both"), default="both")
    parser.add_argument("--systems", nargs="+", choices=sorted(known), default=list(DEFAULT_SYSTEMS))
    parser.add_argument("--images", type=int, default=2000, help="SyntheticShapes images of the conv train split")
    parser.add_argument("--planted-rows", type=int, default=2 ** 18, help="planted train rows (val / test: 1/8)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--k", type=int, default=16, help="k on the conv rows")
    parser.add_argument("--planted-k", type=int, default=8, help="k on the planted rows (8 atoms are active per row)")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr-sweep", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2],
                        help="rates every system is trained at (each chooses its own on the validation split)")
    parser.add_argument("--dead-window", type=int, default=None,
                        help="rows without firing after which a latent is dead, for every recipe with AuxK "
                             "(default: max(4 batches, half the train rows))")
    parser.add_argument("--memory-steps", type=int, default=100, help="steps of the peak-memory run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args()
    if args.quick:
        args.images, args.planted_rows, args.steps, args.width, args.k, args.batch_size = 250, 2 ** 15, 100, 512, 8, 512
        args.planted_k = 8
        args.lr_sweep, args.memory_steps = [2e-3, 8e-3], 30
    if args.threads:
        torch.set_num_threads(args.threads)
    kinds = DATA_KINDS if args.data == "both" else (args.data,)
    archs = ARCHS if args.arch == "both" else (args.arch,)
    entries = [known[name] for name in args.systems]
    device = torch.device(args.device)
    memory = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
              else "torch CPU allocations (profiler) + tracemalloc")
    started = time.perf_counter()
    results: dict[str, dict[str, dict[str, Any]]] = {}
    described: dict[str, dict[str, Any]] = {}
    ratios: dict[str, float] = {}
    best_peer: dict[str, str | None] = {}
    scratch = Path(tempfile.mkdtemp(prefix="sae-bench-", dir=args.dir))
    try:
        for kind in kinds:
            data = conv_data(args, scratch) if kind == "conv" else planted_data(args, scratch)
            described[kind] = {"source": data.description, "d_in": data.d,
                               **{f"{split}_rows": data.rows(split) for split in ("train", "validation", "test")}}
            print(f"{kind}: {data.description}; rows of width {data.d}: " + ", ".join(
                f"{data.rows(split):,} {split}" for split in ("train", "validation", "test")), flush=True)
            results[kind] = {}
            for arch in archs:
                k = args.planted_k if kind == "planted" else args.k
                print(f"  {arch}: width {args.width}, k {k}, {args.steps} steps x {args.batch_size} rows", flush=True)
                results[kind][arch] = compare(data, arch, entries, args, scratch)
                found, best_peer[f"{kind}_{arch}"] = ratios_of(kind, arch, results[kind][arch], entries)
                ratios.update(found)
            del data
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    wall = time.perf_counter() - started

    for kind, by_arch in results.items():
        for arch, by_system in by_arch.items():
            print_table(kind, arch, by_system, memory)
    print()
    for kind, by_arch in results.items():
        for arch in by_arch:
            key = f"{kind}_{arch}_"
            if key + "fvu_vs_best_peer" not in ratios:
                continue
            rows_per_s = ", ".join(f"{k[len(key) + len('rows_per_s_vs_'):]} {v:.2f}x" for k, v in ratios.items()
                                   if k.startswith(key + "rows_per_s_vs_"))
            print(f"{kind}/{arch}: mechlens FVU / best peer ({best_peer[f'{kind}_{arch}']}) "
                  f"{ratios[key + 'fvu_vs_best_peer']:.3f} at matched L0 (target <= 1.0); "
                  f"dead % minus best peer's {ratios[key + 'dead_pct_minus_best_peer']:+.1f}; rows/s {rows_per_s} "
                  "(target >= 1.0)")
    notes = [f"{s.name}: not installed (pip install {s.requires})" for s in entries if not s.available()]
    notes += [f"{s.name} cannot train {arch}" for s in entries for arch in archs if arch not in s.archs]
    for note in notes:
        print(f"note: {note}")
    figures = {
        "settings": {"width": args.width, "k": args.k, "planted_k": args.planted_k, "steps": args.steps, "batch_size": args.batch_size,
                     "lr_sweep": list(args.lr_sweep), "memory_steps": min(args.memory_steps, args.steps),
                     "device": args.device, "threads": torch.get_num_threads(), "seed": args.seed,
                     "peak_memory": memory, "systems": {s.name: s.how for s in entries}, "quick": args.quick,
                     "wall_seconds": round(wall, 1)},
        "data": described,
        "results": results,
        "best_peer": best_peer,
        "notes": notes,
    }
    print(json.dumps({"benchmark": "sae_vs_peers", "figures": figures, "ratios": ratios}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
