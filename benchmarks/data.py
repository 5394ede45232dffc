"""Real data, read from locally installed packages only (never downloaded).

- Fashion-MNIST: Debian package ``dataset-fashion-mnist`` (IDX files under
  /usr/share/datasets/fashion-mnist). MultiFashion puts two items on a 36×36 canvas, one top-left
  and one bottom-right.
- QM9: the ``qm9pack`` wheel ships the molecules as CSV files; they are read directly (importing
  the package fails on modern setuptools).
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_HINT = "Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist"
QM9_HINT = "QM9 is not installed: pip install qm9pack"

# Coarse garment group of each Fashion-MNIST class: tops, bottoms, footwear, accessories.
FASHION_GROUP = np.array([0, 1, 0, 0, 0, 2, 0, 2, 3, 2])


class DataMissing(RuntimeError):
    """A data set is not installed; the message says how to install it."""


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    prefix = {"train": "train", "test": "t10k"}[split]
    images = FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz"
    labels = FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.exists() or not labels.exists():
        raise DataMissing(FASHION_HINT)
    return _read_idx(images), _read_idx(labels)


@dataclass
class MultiFashion:
    images: torch.Tensor  # [n, 36, 36] float in [0, 1]
    labels: torch.Tensor  # [n, 3]: left item, right item, coarse group of the left item


def multifashion(split: str, size: int, seed: int = 0) -> MultiFashion:
    """Two Fashion-MNIST items on a 36×36 canvas: top-left at (0, 0), bottom-right at (8, 8),
    overlapping in the middle (pixel-wise maximum)."""
    images, labels = fashion_mnist(split)
    rng = np.random.default_rng(seed)
    left = rng.choice(len(images), size, replace=size > len(images))
    right = rng.choice(len(images), size, replace=size > len(images))
    canvas = np.zeros((size, 36, 36), dtype=np.uint8)
    canvas[:, :28, :28] = images[left]
    canvas[:, 8:, 8:] = np.maximum(canvas[:, 8:, 8:], images[right])
    y = np.stack([labels[left], labels[right], FASHION_GROUP[labels[left]]], axis=1)
    return MultiFashion(torch.from_numpy(canvas).float() / 255.0, torch.from_numpy(y).long())


QM9_TARGETS = ["mu", "alpha", "homo", "lumo", "r2", "zpve", "U0", "U", "H", "G", "Cv"]
QM9_COLUMNS = {
    "mu": "Dipole_debye",
    "alpha": "Polarizability_bohr3",
    "homo": "HOMO_au",
    "lumo": "LUMO_au",
    "r2": "R2_bohr2",
    "zpve": "ZPVE_au",
    "U0": "InternalEnergy_0K_au",
    "U": "InternalEnergy_298K_au",
    "H": "Enthalphy_298K_au",
    "G": "GibbsFreeEnergy_298K_au",
    "Cv": "Heatcapacity_Cv_cal_mol_K",
}
ATOMS = {"H": 0, "C": 1, "N": 2, "O": 3, "F": 4}


@dataclass
class QM9:
    atoms: torch.Tensor  # [n, 29] atom type index, -1 = padding
    positions: torch.Tensor  # [n, 29, 3] centred coordinates in Å
    targets: torch.Tensor  # [n, 11] raw targets in the CSV's units


def _qm9_files() -> list[Path]:
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise DataMissing(QM9_HINT)
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    files = sorted(folder.glob("qm9_part*.csv"))
    if not files:
        raise DataMissing(QM9_HINT)
    return files


def qm9(limit: int | None = None, cache: Path | None = None) -> QM9:
    """All (or the first ``limit``) molecules of QM9, padded to 29 atoms."""
    if cache is not None and cache.exists():
        data = torch.load(cache)
        return QM9(**{k: v[:limit] for k, v in data.items()})
    import pandas as pd

    frames = [pd.read_csv(f) for f in _qm9_files()]
    table = pd.concat(frames, ignore_index=True)
    if limit is not None:
        table = table.iloc[:limit]
    n = len(table)
    atoms = np.full((n, 29), -1, dtype=np.int64)
    positions = np.zeros((n, 29, 3), dtype=np.float32)
    for row, (symbols, xyz) in enumerate(zip(table["Elements"], table["XYZ_Ang"], strict=True)):
        flat = xyz.replace("[", " ").replace("]", " ").replace(",", " ").split()
        coordinates = np.array(flat, dtype=np.float32).reshape(-1, 3)
        kinds = [ATOMS[s] for s in _symbols(symbols)]
        atoms[row, : len(kinds)] = kinds
        positions[row, : len(kinds)] = coordinates - coordinates.mean(0)
    targets = np.array(table[[QM9_COLUMNS[t] for t in QM9_TARGETS]].to_numpy(dtype=np.float32))
    data = {
        "atoms": torch.from_numpy(atoms),
        "positions": torch.from_numpy(positions),
        "targets": torch.from_numpy(targets),
    }
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, cache)
    return QM9(**data)


def _symbols(value: str) -> list[str]:
    cleaned = value.replace("[", " ").replace("]", " ").replace("'", " ").replace('"', " ")
    cleaned = cleaned.replace(",", " ")
    return cleaned.split()
