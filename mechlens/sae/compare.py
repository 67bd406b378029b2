"""The dictionary-level metrics SAEs are compared by: does an SAE recover known features, does it
learn the same features twice, does it absorb or split a feature hierarchy.

>>> planted = planted_dictionary(512, 128, 8, parents=32, children_per_parent=3, seed=0)
>>> rows, codes = planted.sample(50_000, seed=1)
>>> mmcs(sae, planted)                               # recovery of the known atoms, 1 = all found
>>> print(stability(sae_seed0, sae_seed1))          # same features across seeds? (Hungarian)
>>> print(absorption(sae, planted, rows, codes))    # parent latent silent when a child fires
>>> print(splitting(sae, planted))                  # atoms covered by several latents

Conventions, shared by every function here:

* a *dictionary* is an SAE (its decoder rows ``W_dec`` ``[width, d]``: latent ``i`` writes along
  row ``i``), a tensor / ndarray ``[n, d]`` of directions, or a
  :class:`~mechlens.sae.synthetic.PlantedDictionary` (its ``atoms``). Rows are compared by cosine,
  so their norms do not matter; a zero or non-finite row is an error (its cosine is undefined).
* cosines are **signed**. SAE latents are non-negative, so a latent writing along ``-v`` is the
  opposite feature of one writing along ``v``, not the same one: a sign-flipped decoder row does
  not reconstruct the same thing. This is also the convention of Sharkey et al.'s MMCS and of
  overcomplete's ``cosine_hungarian_loss`` (cost ``1 - cos``, signed).
* cosine matrices are computed in blocks of ``chunk_size`` x ``chunk_size`` (float32, or float64
  when an input is float64), so :func:`mmcs` of two 65k-wide dictionaries never holds the 16 GB
  matrix. The Hungarian matching of :func:`stability` needs the whole ``[width_a, width_b]``
  matrix (4 bytes per entry, plus scipy's float64 copy) and cubic time: fine up to ~16k latents.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence, Union

import numpy as np
import torch
from torch import nn

from mechlens.sae.modules import SAE
from mechlens.sae.synthetic import PlantedDictionary

__all__ = [
    "AbsorptionResult",
    "ParentAbsorption",
    "SeedStabilityResult",
    "SplittingResult",
    "StabilityResult",
    "absorption",
    "max_cosines",
    "mmcs",
    "seed_stability",
    "splitting",
    "stability",
]

Dictionary = Union[SAE, torch.Tensor, np.ndarray, PlantedDictionary]
"""What the functions here accept as a set of directions (see the module docstring)."""

DEFAULT_CHUNK = 4096


# ---------------------------------------------------------------------------- directions
def _raw_directions(source: Any, what: str) -> torch.Tensor:
    if isinstance(source, PlantedDictionary):
        tensor = source.atoms
    elif isinstance(source, SAE) or isinstance(getattr(source, "W_dec", None), torch.Tensor):
        tensor = source.W_dec
    elif isinstance(source, torch.Tensor):
        tensor = source
    elif isinstance(source, np.ndarray):
        if not np.issubdtype(source.dtype, np.floating) and not np.issubdtype(source.dtype, np.integer):
            raise ValueError(f"{what}: an ndarray of directions must be numeric, got dtype {source.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(source))
    else:
        raise ValueError(f"{what}: pass an SAE, a PlantedDictionary or a [n, d] tensor / ndarray of directions, "
                         f"got {type(source).__name__}")
    tensor = tensor.detach()
    if tensor.dim() != 2 or tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"{what}: directions must be a non-empty [n, d] matrix, got shape {tuple(tensor.shape)}")
    return tensor


def _unit(tensor: torch.Tensor, what: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    tensor = tensor.to(device=device, dtype=dtype)
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{what}: the directions contain NaN or infinite values")
    norms = tensor.norm(dim=1, keepdim=True)
    zero = torch.nonzero(norms.squeeze(1) == 0).flatten()
    if len(zero):
        raise ValueError(f"{what}: {len(zero)} direction(s) have zero norm (first: row {int(zero[0])}), so their "
                         "cosine is undefined; drop those rows before comparing")
    return tensor / norms


def _pair(learned: Any, reference: Any, names: tuple[str, str], device: str | torch.device | None,
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Both dictionaries as unit rows on one device, in one dtype; mismatched ``d`` is an error."""
    a, b = _raw_directions(learned, names[0]), _raw_directions(reference, names[1])
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{names[0]} has {a.shape[1]}-dim directions but {names[1]} has {b.shape[1]}-dim ones; "
                         "compare dictionaries of the same layer (same d)")
    dev = torch.device(device) if device is not None else (a.device if a.device.type != "cpu" else b.device)
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    return _unit(a, names[0], dev, dtype), _unit(b, names[1], dev, dtype)


def _check_chunk(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return int(chunk_size)


def _blocks(a: torch.Tensor, b: torch.Tensor, chunk: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(i, j, a[i:i+chunk] @ b[j:j+chunk].T)`` over the whole cosine matrix, block by block."""
    for i in range(0, a.shape[0], chunk):
        for j in range(0, b.shape[0], chunk):
            yield i, j, a[i:i + chunk] @ b[j:j + chunk].T


@torch.no_grad()
def _best_learned(learned: torch.Tensor, reference: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per reference row: the largest cosine with any learned row and that row's index."""
    best = torch.full((reference.shape[0],), -math.inf, dtype=reference.dtype, device=reference.device)
    index = torch.zeros(reference.shape[0], dtype=torch.long, device=reference.device)
    for i, j, block in _blocks(reference, learned, chunk):
        values, where = block.max(dim=1)
        rows = slice(i, i + block.shape[0])
        better = values > best[rows]
        best[rows] = torch.where(better, values, best[rows])
        index[rows] = torch.where(better, where + j, index[rows])
    return best, index


@torch.no_grad()
def _cosine_matrix(a: torch.Tensor, b: torch.Tensor, chunk: int) -> np.ndarray:
    out = np.empty((a.shape[0], b.shape[0]), dtype=np.float64 if a.dtype == torch.float64 else np.float32)
    for i, j, block in _blocks(a, b, chunk):
        out[i:i + block.shape[0], j:j + block.shape[1]] = block.cpu().numpy()
    return out


# ---------------------------------------------------------------------------- MMCS
def max_cosines(learned: Dictionary, reference: Dictionary, *, chunk_size: int = DEFAULT_CHUNK,
                device: str | torch.device | None = None) -> np.ndarray:
    """For every ``reference`` direction, the largest signed cosine with any ``learned`` one
    (``[n_reference]``, float64): how well each known feature was recovered.

    ``learned`` / ``reference``: an SAE (decoder rows), a PlantedDictionary (atoms) or a
    ``[n, d]`` tensor / ndarray. The cosine matrix is computed in ``chunk_size`` blocks on
    ``device`` (default: the device of the inputs)."""
    chunk = _check_chunk(chunk_size)
    learned_u, reference_u = _pair(learned, reference, ("learned", "reference"), device)
    best, _ = _best_learned(learned_u, reference_u, chunk)
    return best.double().cpu().numpy()


def mmcs(learned: Dictionary, reference: Dictionary, *, chunk_size: int = DEFAULT_CHUNK,
         device: str | torch.device | None = None) -> float:
    """Mean Max Cosine Similarity (Sharkey et al. 2022, "Taking features out of superposition with
    sparse autoencoders"): the mean over ``reference`` directions of their largest signed cosine
    with any ``learned`` direction. 1 means every reference feature has a learned latent pointing
    exactly along it; random directions in ``d`` dimensions score about ``sqrt(2 ln n / d)``.
    Not symmetric: it asks whether ``reference`` is contained in ``learned``. See
    :func:`max_cosines` for the arguments and the per-direction values."""
    return float(max_cosines(learned, reference, chunk_size=chunk_size, device=device).mean())


# ---------------------------------------------------------------------------- stability
@dataclass
class StabilityResult:
    """One-to-one matching of the decoder directions of two SAEs (Hungarian algorithm).

    ``pairs`` ``[m, 2]``: (latent of ``a``, latent of ``b``) for the ``m = min(width_a, width_b)``
    matched pairs, in increasing ``a`` index; ``cosines`` ``[m]`` their signed cosines;
    ``mean_cosine`` their mean (1: the same dictionary up to a permutation of latents);
    ``fraction_above`` the fraction of pairs with cosine above ``threshold``."""

    mean_cosine: float
    fraction_above: float
    threshold: float
    widths: tuple[int, int]
    pairs: np.ndarray = field(repr=False)
    cosines: np.ndarray = field(repr=False)

    @property
    def matched(self) -> int:
        return int(len(self.cosines))

    def to_json(self, *, with_pairs: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {"mean_cosine": self.mean_cosine, "fraction_above": self.fraction_above,
                                "threshold": self.threshold, "width_a": self.widths[0], "width_b": self.widths[1],
                                "matched": self.matched}
        if with_pairs:
            data["pairs"] = self.pairs.tolist()
            data["cosines"] = self.cosines.tolist()
        return data

    def __str__(self) -> str:
        return (f"stability: mean matched cosine {self.mean_cosine:.4f} over {self.matched} pairs "
                f"(widths {self.widths[0]} x {self.widths[1]}), {100 * self.fraction_above:.1f}% above "
                f"{self.threshold:g}")

    def _repr_html_(self) -> str:
        from mechlens._display import html_table

        return html_table([self.to_json()], ["width_a", "width_b", "matched", "mean_cosine", "fraction_above",
                                             "threshold"], caption="SAE stability (Hungarian matching)")


def _check_threshold(threshold: float, name: str = "threshold") -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1.0 <= threshold <= 1.0:
        raise ValueError(f"{name} must be a cosine between -1 and 1, got {threshold!r}")
    return float(threshold)


def stability(a: Dictionary, b: Dictionary, *, threshold: float = 0.7, chunk_size: int = DEFAULT_CHUNK,
              device: str | torch.device | None = None) -> StabilityResult:
    """Match the decoder directions of ``a`` and ``b`` one to one, maximising the total signed
    cosine (``scipy.optimize.linear_sum_assignment``), and report the mean matched cosine, the
    pairs and the fraction of pairs above ``threshold``.

    Signed, as overcomplete's ``cosine_hungarian_loss`` (which minimises ``1 - cos``, i.e.
    maximises the signed cosine; our ``mean_cosine`` is ``1 - loss / m``): SAE latents are
    non-negative, so a latent along ``-v`` is a different feature from one along ``v``. Widths may
    differ: ``min(width_a, width_b)`` pairs are matched, the surplus latents of the wider one left
    out. Memory: the full ``[width_a, width_b]`` cosine matrix (see the module docstring)."""
    from scipy.optimize import linear_sum_assignment

    chunk = _check_chunk(chunk_size)
    threshold = _check_threshold(threshold)
    a_u, b_u = _pair(a, b, ("a", "b"), device)
    cos = _cosine_matrix(a_u, b_u, chunk)
    rows, cols = linear_sum_assignment(cos, maximize=True)
    matched = cos[rows, cols].astype(np.float64)
    return StabilityResult(mean_cosine=float(matched.mean()), fraction_above=float((matched > threshold).mean()),
                           threshold=threshold, widths=(int(cos.shape[0]), int(cos.shape[1])),
                           pairs=np.stack([rows, cols], axis=1).astype(np.int64), cosines=matched)


@dataclass
class SeedStabilityResult:
    """:func:`stability` of every pair of a list of SAEs (typically the same recipe, several seeds).

    ``matrix`` ``[n, n]``: mean matched cosine of SAEs ``i`` and ``j`` (symmetric, 1 on the
    diagonal); ``fraction_above`` the same for the fraction of pairs above ``threshold``;
    ``mean`` / ``min`` over the ``n (n - 1) / 2`` distinct pairs."""

    names: list[str]
    matrix: np.ndarray = field(repr=False)
    fraction_above: np.ndarray = field(repr=False)
    threshold: float

    def _upper(self, values: np.ndarray) -> np.ndarray:
        return values[np.triu_indices(len(self.names), k=1)]

    @property
    def mean(self) -> float:
        return float(self._upper(self.matrix).mean())

    @property
    def min(self) -> float:
        return float(self._upper(self.matrix).min())

    def pairs(self) -> list[dict[str, Any]]:
        """One dict per distinct pair: the two names, mean matched cosine, fraction above threshold."""
        return [{"a": self.names[i], "b": self.names[j], "mean_cosine": float(self.matrix[i, j]),
                 "fraction_above": float(self.fraction_above[i, j])}
                for i, j in itertools.combinations(range(len(self.names)), 2)]

    def to_json(self) -> dict[str, Any]:
        return {"names": list(self.names), "mean_cosine": self.matrix.tolist(),
                "fraction_above": self.fraction_above.tolist(), "threshold": self.threshold, "mean": self.mean,
                "min": self.min, "pairs": self.pairs()}

    def __str__(self) -> str:
        n = len(self.names)
        width = max(6, len(str(n - 1)) + 2)
        lines = [f"stability: mean matched decoder cosine (Hungarian); mean {self.mean:.4f}, min {self.min:.4f} over "
                 f"{n * (n - 1) // 2} pair(s); fraction of pairs above {self.threshold:g} in parentheses"]
        lines += [f"  [{i}] {name}" for i, name in enumerate(self.names)]
        lines.append(" " * 6 + "".join(f"[{j}]".rjust(width + 9) for j in range(n)))
        for i in range(n):
            cells = "".join(f"{self.matrix[i, j]:.3f} ({self.fraction_above[i, j]:.2f})".rjust(width + 9)
                            for j in range(n))
            lines.append(f"  [{i}]".ljust(6) + cells)
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from mechlens._display import html_table

        rows = [{"sae": name, **{f"[{j}]": float(self.matrix[i, j]) for j in range(len(self.names))}}
                for i, name in enumerate(self.names)]
        columns = ["sae"] + [f"[{j}]" for j in range(len(self.names))]
        return html_table(rows, columns, caption=f"SAE stability: mean matched cosine (mean {self.mean:.4f}, "
                                                 f"min {self.min:.4f})")


def seed_stability(saes: Sequence[Dictionary], *, names: Sequence[str] | None = None, threshold: float = 0.7,
                   chunk_size: int = DEFAULT_CHUNK, device: str | torch.device | None = None) -> SeedStabilityResult:
    """:func:`stability` of every pair of ``saes`` (at least two); ``mean`` / ``min`` of the
    result summarise how reproducible the learned dictionary is across seeds."""
    saes = list(saes)
    if len(saes) < 2:
        raise ValueError(f"seed_stability needs at least two SAEs to compare, got {len(saes)}")
    names = [str(n) for n in names] if names is not None else [f"sae{i}" for i in range(len(saes))]
    if len(names) != len(saes):
        raise ValueError(f"names has {len(names)} entries for {len(saes)} SAEs; pass one name per SAE")
    n = len(saes)
    matrix, above = np.eye(n), np.eye(n)
    for i, j in itertools.combinations(range(n), 2):
        result = stability(saes[i], saes[j], threshold=threshold, chunk_size=chunk_size, device=device)
        matrix[i, j] = matrix[j, i] = result.mean_cosine
        above[i, j] = above[j, i] = result.fraction_above
    return SeedStabilityResult(names, matrix, above, _check_threshold(threshold))


# ---------------------------------------------------------------------------- absorption
@dataclass
class ParentAbsorption:
    """Absorption of one planted parent atom.

    ``latent``: the SAE latent whose decoder row is closest to the parent atom, with ``cosine``;
    ``children``: how many child atoms it has; ``rows_with_child`` / ``rows_alone``: rows where the
    parent is active with at least one child / with none; ``absorption``: fraction of the
    ``rows_with_child`` where ``latent`` does not fire (NaN when there are none);
    ``miss_rate_alone``: the same on ``rows_alone`` (the baseline: a latent that is just weak
    misses there too); ``absorbing_cosine``: mean cosine between the parent atom and the decoder
    rows of the latents best matching its children (a child latent that absorbed the parent leans
    towards it)."""

    parent: int
    latent: int
    cosine: float
    children: int
    rows_with_child: int
    rows_alone: int
    absorption: float
    miss_rate_alone: float
    absorbing_cosine: float


@dataclass
class AbsorptionResult:
    """Per-parent :class:`ParentAbsorption` and the means over the parents with rows
    (``mean``: absorption rate, ``mean_alone``: miss rate without a child)."""

    parents: list[ParentAbsorption]
    fire_threshold: float

    @staticmethod
    def _mean(values: list[float]) -> float:
        kept = [v for v in values if not math.isnan(v)]
        return float(np.mean(kept)) if kept else float("nan")

    @property
    def mean(self) -> float:
        return self._mean([p.absorption for p in self.parents])

    @property
    def mean_alone(self) -> float:
        return self._mean([p.miss_rate_alone for p in self.parents])

    def to_json(self) -> dict[str, Any]:
        return {"mean": self.mean, "mean_alone": self.mean_alone, "fire_threshold": self.fire_threshold,
                "parents": [vars(p).copy() for p in self.parents]}

    def __str__(self) -> str:
        lines = [f"absorption {self.mean:.3f} (parent latent silent when a child fires; {self.mean_alone:.3f} "
                 f"when the parent fires alone), {len(self.parents)} parent(s)"]
        for p in self.parents[:20]:
            lines.append(f"  atom {p.parent:>4} -> latent {p.latent:>5} (cos {p.cosine:.2f}): absorption "
                         f"{p.absorption:.3f} on {p.rows_with_child} rows, alone {p.miss_rate_alone:.3f} on "
                         f"{p.rows_alone} rows")
        if len(self.parents) > 20:
            lines.append(f"  ... {len(self.parents) - 20} more parents")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from mechlens._display import html_table

        columns = ["parent", "latent", "cosine", "children", "rows_with_child", "rows_alone", "absorption",
                   "miss_rate_alone", "absorbing_cosine"]
        return html_table([vars(p) for p in self.parents], columns,
                          caption=f"absorption {self.mean:.3f} (alone {self.mean_alone:.3f})")


def _encoder_of(sae: Any) -> Any:
    if not callable(getattr(sae, "encode", None)) or not isinstance(getattr(sae, "W_dec", None), torch.Tensor):
        raise ValueError(f"sae: pass an SAE (an object with encode() and a W_dec [width, d] tensor), got "
                         f"{type(sae).__name__}")
    return sae


def _hierarchy(planted: Any) -> tuple[PlantedDictionary, list[int]]:
    if not isinstance(planted, PlantedDictionary):
        raise ValueError(f"planted: pass the PlantedDictionary the rows were sampled from, got {type(planted).__name__}")
    parents = sorted({int(p) for p in planted.parents if p >= 0})
    if not parents:
        raise ValueError("planted has no parent/child hierarchy: build it with planted_dictionary(parents=P, "
                         "children_per_parent=C)")
    return planted, parents


@torch.no_grad()
def absorption(sae: Any, planted: PlantedDictionary, rows: torch.Tensor | np.ndarray,
               codes: torch.Tensor | np.ndarray, *, fire_threshold: float = 0.0, batch_size: int = 4096,
               chunk_size: int = DEFAULT_CHUNK) -> AbsorptionResult:
    """Feature absorption on rows with a known hierarchy (``rows, codes = planted.sample(n)``).

    Chanin et al. 2024, "A is for Absorption": when a child feature ("dog") always implies its
    parent ("animal"), a sparsity penalty rewards folding the parent's direction into the child's
    latent, so the parent's latent stops firing exactly where the child fires. Here each planted
    parent atom is matched to its best SAE latent (largest signed decoder cosine); its
    **absorption rate** is, among rows where the parent is truly active *and* one of its children
    is, the fraction where that latent does not fire (``z <= fire_threshold``). The same miss rate
    on rows where the parent is active without any child (``miss_rate_alone``) is the baseline
    that shows the child is the cause. This is the false-negative form of Chanin et al.'s metric
    (they also check that the absorbing latent carries the parent direction: see
    ``absorbing_cosine``). Matryoshka SAEs (Bussmann et al. 2025, "Learning Multi-Level Features
    with Matryoshka Sparse Autoencoders") are built to keep it near 0.

    ``sae``: anything with ``encode(rows) -> [n, width]`` and ``W_dec``; ``rows`` ``[n, d]`` what
    the SAE reads; ``codes`` ``[n, n_atoms]`` the planted codes of those rows (> 0: active)."""
    sae = _encoder_of(sae)
    planted, parents = _hierarchy(planted)
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    rows_t = torch.as_tensor(rows)
    codes_np = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    if rows_t.dim() != 2 or rows_t.shape[1] != planted.d:
        raise ValueError(f"rows must be [n, {planted.d}] (the rows sampled from planted), got {tuple(rows_t.shape)}")
    if codes_np.shape != (rows_t.shape[0], planted.n_atoms):
        raise ValueError(f"codes must be [{rows_t.shape[0]}, {planted.n_atoms}] (the codes planted.sample returned "
                         f"with the rows), got {tuple(codes_np.shape)}")
    if rows_t.shape[0] == 0:
        raise ValueError("no rows: pass rows sampled from planted (planted.sample(n))")
    learned, atoms = _pair(sae, planted, ("sae decoder", "planted atoms"), None)
    best_cos, best_latent = _best_learned(learned, atoms, _check_chunk(chunk_size))
    latents = [int(best_latent[p]) for p in parents]
    fires = _fires(sae, rows_t, sorted(set(latents)), float(fire_threshold), int(batch_size))
    active = codes_np > 0
    results = []
    for parent, latent in zip(parents, latents):
        children = np.flatnonzero(planted.parents == parent)
        child_active = active[:, children].any(axis=1)
        with_child = active[:, parent] & child_active
        alone = active[:, parent] & ~child_active
        silent = ~fires[latent]
        child_latents = best_latent[torch.as_tensor(children, device=best_latent.device)]
        absorbing = float((learned[child_latents] @ atoms[parent]).mean())
        results.append(ParentAbsorption(
            parent=parent, latent=latent, cosine=float(best_cos[parent]), children=int(len(children)),
            rows_with_child=int(with_child.sum()), rows_alone=int(alone.sum()),
            absorption=float(silent[with_child].mean()) if with_child.any() else float("nan"),
            miss_rate_alone=float(silent[alone].mean()) if alone.any() else float("nan"),
            absorbing_cosine=absorbing))
    if not any(p.rows_with_child for p in results):
        raise ValueError("no row has a parent atom active together with one of its children; sample more rows "
                         "(planted.sample(n) with a larger n)")
    return AbsorptionResult(results, float(fire_threshold))


def _fires(sae: Any, rows: torch.Tensor, latents: list[int], threshold: float, batch_size: int) -> dict[int, np.ndarray]:
    """``{latent: bool [n]}``: whether each of ``latents`` fires (``z > threshold``) on each row."""
    device = sae.W_dec.device
    mode = _eval(sae)
    index = torch.as_tensor(latents, device=device)
    parts = []
    with mode:
        for start in range(0, rows.shape[0], batch_size):
            x = rows[start:start + batch_size].to(device=device, dtype=torch.float32)
            z = sae.encode(x)
            if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] != x.shape[0]:
                raise ValueError(f"sae.encode must return latents [{x.shape[0]}, width], got "
                                 f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
            parts.append((z[:, index] > threshold).cpu().numpy())
    fired = np.concatenate(parts, axis=0)
    return {latent: fired[:, k] for k, latent in enumerate(latents)}


def _eval(sae: Any) -> Any:
    from mechlens.engine import eval_mode

    return eval_mode(sae) if isinstance(sae, nn.Module) else contextlib.nullcontext()


# ---------------------------------------------------------------------------- splitting
@dataclass
class SplittingResult:
    """Per reference direction, ``counts[i]``: how many learned latents have a decoder cosine above
    ``threshold`` with it. 1: one latent for the feature; >1: the feature split across latents
    (``split_fraction`` of the directions); 0: not recovered (``missed_fraction``)."""

    counts: np.ndarray = field(repr=False)
    threshold: float

    @property
    def mean(self) -> float:
        return float(self.counts.mean())

    @property
    def split_fraction(self) -> float:
        return float((self.counts > 1).mean())

    @property
    def missed_fraction(self) -> float:
        return float((self.counts == 0).mean())

    def to_json(self, *, with_counts: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {"directions": int(len(self.counts)), "threshold": self.threshold, "mean": self.mean,
                                "split_fraction": self.split_fraction, "missed_fraction": self.missed_fraction,
                                "max": int(self.counts.max())}
        if with_counts:
            data["counts"] = self.counts.tolist()
        return data

    def __str__(self) -> str:
        return (f"splitting: {self.mean:.3f} latents per feature above cosine {self.threshold:g} "
                f"({len(self.counts)} features; {100 * self.split_fraction:.1f}% split into >1 latent, "
                f"{100 * self.missed_fraction:.1f}% without one, at most {int(self.counts.max())})")

    def _repr_html_(self) -> str:
        from mechlens._display import html_table

        return html_table([self.to_json()], ["directions", "threshold", "mean", "split_fraction", "missed_fraction",
                                             "max"], caption="feature splitting")


@torch.no_grad()
def splitting(sae: Dictionary, planted: Dictionary, *, threshold: float = 0.5, chunk_size: int = DEFAULT_CHUNK,
              device: str | torch.device | None = None) -> SplittingResult:
    """Feature splitting: for every planted atom (or reference direction), the number of SAE
    latents whose decoder row has a signed cosine above ``threshold`` with it.

    A feature that is split (Bussmann et al. 2025: wider flat SAEs break a general feature into
    several specific latents, which Matryoshka SAEs avoid for their early latents) shows as
    several latents close to it. ``threshold`` 0.5 (60 degrees) is far above chance: random
    directions in ``d`` dimensions have cosines of standard deviation ``1 / sqrt(d)`` (0.125 at
    d = 64), yet below the cosine of a specific latent ``parent + child`` to its parent (~0.7).
    Arguments as :func:`max_cosines` (``sae`` the learned, ``planted`` the reference)."""
    chunk = _check_chunk(chunk_size)
    threshold = _check_threshold(threshold)
    learned, reference = _pair(sae, planted, ("sae", "planted"), device)
    counts = torch.zeros(reference.shape[0], dtype=torch.long, device=reference.device)
    for i, _, block in _blocks(reference, learned, chunk):
        counts[i:i + block.shape[0]] += (block > threshold).sum(dim=1)
    return SplittingResult(counts.cpu().numpy(), threshold)
