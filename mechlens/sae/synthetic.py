"""Planted dictionaries: activations built from known sparse features, to check that an SAE
recovers them (MMCS, absorption) rather than only that it reconstructs.

>>> planted = planted_dictionary(n_atoms=512, d=128, active=8, seed=0)
>>> rows, codes = planted.sample(100_000, seed=1)       # rows = codes @ planted.atoms (+ noise)

Each row switches on ``active`` atoms chosen at random (uniformly, or with Zipf-distributed
frequencies: real features are not equally common) with magnitudes drawn from an exponential
distribution. With ``children_per_parent`` the first atoms are organised as a hierarchy: a child
atom only fires together with its parent (a "dog" feature implies "animal"), the situation in
which SAEs absorb a parent into its children (Chanin et al. 2024) and Matryoshka SAEs should not.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["PlantedDictionary", "planted_dictionary"]


@dataclass(frozen=True)
class PlantedDictionary:
    """Unit-norm ``atoms`` ``[n_atoms, d]`` and how rows are drawn from them.

    ``frequencies``: the probability weights of picking each atom (sum 1); ``parents``: for each
    atom, the index of its parent atom or -1; ``noise``: standard deviation of the isotropic
    Gaussian noise added to every row."""

    atoms: torch.Tensor
    active: int
    frequencies: np.ndarray
    parents: np.ndarray
    noise: float = 0.0

    @property
    def n_atoms(self) -> int:
        return int(self.atoms.shape[0])

    @property
    def d(self) -> int:
        return int(self.atoms.shape[1])

    def sample(self, n: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows [n, d], codes [n, n_atoms])`` with ``rows = codes @ atoms + noise``. A row has
        ``active`` atoms drawn by frequency (without replacement), plus the parents of its
        children (so a hierarchy can add a few more)."""
        if int(n) != n or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        rng = np.random.default_rng(seed)
        # Gumbel top-k: `active` distinct atoms per row, each with probability weight `frequencies`
        keys = np.log(self.frequencies)[None, :] - np.log(-np.log(rng.random((int(n), self.n_atoms))))
        chosen = np.argpartition(-keys, self.active - 1, axis=1)[:, :self.active]
        mask = np.zeros((int(n), self.n_atoms), dtype=bool)
        np.put_along_axis(mask, chosen, True, axis=1)
        has_parent = self.parents >= 0
        if has_parent.any():
            rows_with_child, child = np.nonzero(mask[:, has_parent])
            mask[rows_with_child, self.parents[has_parent][child]] = True
        magnitudes = rng.exponential(1.0, size=mask.shape).astype(np.float32) + 0.1
        codes = torch.from_numpy(np.where(mask, magnitudes, 0.0).astype(np.float32))
        rows = codes @ self.atoms
        if self.noise > 0:
            rows = rows + self.noise * torch.from_numpy(rng.standard_normal(rows.shape).astype(np.float32))
        return rows, codes


def planted_dictionary(n_atoms: int = 512, d: int = 128, active: int = 8, *, seed: int = 0, zipf: float = 0.0,
                       children_per_parent: int = 0, parents: int = 0, noise: float = 0.0) -> PlantedDictionary:
    """Random unit atoms in ``d`` dimensions and a sampler of ``active``-sparse rows.

    ``zipf``: exponent of the atom frequencies (0: uniform; 1: the ``r``-th atom is ``1/r`` as
    common as the first); ``parents`` atoms each get ``children_per_parent`` children (the atoms
    that follow them), which only fire with their parent."""
    for name, value in (("n_atoms", n_atoms), ("d", d), ("active", active)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if active > n_atoms:
        raise ValueError(f"active={active} is more than the {n_atoms} atoms")
    if parents * (1 + children_per_parent) > n_atoms:
        raise ValueError(f"{parents} parents with {children_per_parent} children each need "
                         f"{parents * (1 + children_per_parent)} atoms, more than n_atoms={n_atoms}")
    if zipf < 0 or noise < 0:
        raise ValueError("zipf and noise must be >= 0")
    generator = torch.Generator().manual_seed(int(seed))
    atoms = torch.randn(int(n_atoms), int(d), generator=generator)
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    frequencies = 1.0 / np.arange(1, n_atoms + 1, dtype=np.float64) ** zipf
    frequencies = np.random.default_rng(seed).permutation(frequencies)
    parent_of = np.full(int(n_atoms), -1, dtype=np.int64)
    stride = 1 + children_per_parent
    for p in range(parents):
        parent_of[p * stride + 1:(p + 1) * stride] = p * stride
    return PlantedDictionary(atoms, int(active), frequencies / frequencies.sum(), parent_of, float(noise))
