"""Built-in data and small models, generated locally (no downloads).

* :func:`digits` — scikit-learn's 8×8 handwritten digits (1,797 images, shipped with sklearn).
* :func:`sequential_digits` — the same digits read row by row: 8 steps of 8 features.
* :func:`mnist1d_sequences` — MNIST-1D (40-step sequences, 10 classes) from the ``mnist1d``
  package's local generator.
* :func:`flipflop` — the 3-bit flip-flop memory task (Sussillo & Barak 2013): sparse ±1
  pulses on each channel; the target holds the sign of the last pulse.
* :func:`jacobian_with_spectrum` — a synthetic ``D × P`` Jacobian whose NTK has given eigenvalues.
* :func:`mlp`, :class:`RecurrentClassifier`, :class:`RecurrentRegressor` — small models.

All data come back as float tensors of the requested dtype; every generator takes a seed.
:func:`digits` needs scikit-learn and :func:`mnist1d_sequences` the ``mnist1d`` package (the
``data`` extra: ``pip install 'ntkscope[data]'``); each is imported only when its data set is made.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

__all__ = ["jacobian_with_spectrum", "digits", "sequential_digits", "mnist1d_sequences", "flipflop", "mlp", "RecurrentClassifier", "RecurrentRegressor"]


def digits(
    n: int | None = None, *, seed: int = 0, dtype: torch.dtype = torch.float32, test_fraction: float = 0.25
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(X_train, y_train, X_test, y_test)`` from ``sklearn.datasets.load_digits``.

    Pixels scaled to [0, 1] and centred per feature (train statistics); labels are int64.
    ``n`` caps the training set size.  The split is a seeded permutation.
    """
    try:  # on demand: scikit-learn is the optional data extra
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("ntkscope.tasks.digits needs scikit-learn: pip install 'ntkscope[data]'") from e

    data = load_digits()
    X = torch.tensor(data.data, dtype=torch.float64) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_test = int(len(y) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    if n is not None:
        train = train[:n]
    mean = X[train].mean(0)
    return (X[train] - mean).to(dtype), y[train], (X[test] - mean).to(dtype), y[test]


def sequential_digits(
    n: int | None = None, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits as sequences: ``(B, 8 steps, 8 features)`` batch-first, with int64 labels."""
    Xtr, ytr, Xte, yte = digits(n, seed=seed, dtype=dtype)
    return Xtr.reshape(-1, 8, 8), ytr, Xte.reshape(-1, 8, 8), yte


def mnist1d_sequences(
    num_samples: int = 1000, *, seed: int = 42, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MNIST-1D (Greydanus 2020) as sequences: ``(B, 40 steps, 1 feature)`` batch-first, int64 labels.

    Generated locally by the ``mnist1d`` package's own generator (``make_dataset``; its download
    path is never used).  The generator seeds Python's and NumPy's global RNGs; their states are
    restored afterwards.  Returns ``(X_train, y_train, X_test, y_test)`` (80/20 split).
    """
    try:  # on demand: mnist1d is the optional data extra
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:
        raise ImportError("ntkscope.tasks.mnist1d_sequences needs the mnist1d package: pip install 'ntkscope[data]'") from e

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)

    def seq(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(x, dtype=dtype)[..., None]

    return seq(data["x"]), torch.as_tensor(data["y"], dtype=torch.int64), seq(data["x_test"]), torch.as_tensor(data["y_test"], dtype=torch.int64)


def flipflop(
    batch: int = 32, steps: int = 50, bits: int = 3, *, p: float = 0.05, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip-flop memory task: ``(inputs, targets)``, both ``(batch, steps, bits)`` batch-first.

    Each channel receives a +1 or −1 pulse with probability ``p`` per step; the target is the
    sign of the most recent pulse on that channel (0 before the first).
    """
    g = torch.Generator().manual_seed(seed)
    pulses = (torch.rand(batch, steps, bits, generator=g) < p).to(dtype)
    signs = torch.randint(0, 2, (batch, steps, bits), generator=g).to(dtype) * 2 - 1
    inputs = pulses * signs
    targets = torch.zeros_like(inputs)
    state = torch.zeros(batch, bits, dtype=dtype)
    for t in range(steps):
        state = torch.where(inputs[:, t] != 0, inputs[:, t], state)
        targets[:, t] = state
    return inputs, targets


def mlp(
    sizes: list[int], *, activation: type[nn.Module] = nn.Tanh, seed: int = 0, final_activation: bool = False
) -> nn.Sequential:
    """A plain MLP ``sizes[0] → … → sizes[-1]`` with seeded initialisation."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or final_activation:
            layers.append(activation())
    return nn.Sequential(*layers)


_CELLS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


class _Recurrent(nn.Module):
    def __init__(self, kind: str, input_size: int, hidden: int, out: int, num_layers: int = 1, seed: int = 0) -> None:
        super().__init__()
        if kind not in _CELLS:
            raise ValueError(f"unknown recurrent kind {kind!r}; choose one of {sorted(_CELLS)}")
        torch.manual_seed(seed)
        self.kind = kind
        self.rnn = _CELLS[kind](input_size, hidden, num_layers=num_layers, batch_first=True)
        self.readout = nn.Linear(hidden, out)

    def trajectory(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states of the last layer at every step: ``(B, T, hidden)``.

        An explicit zero initial state (built from the input) keeps per-sample ``vmap`` working.
        """
        h0 = x.new_zeros(self.rnn.num_layers, x.shape[0], self.rnn.hidden_size)
        state = (h0, h0.clone()) if self.kind == "lstm" else h0
        out, _ = self.rnn(x, state)
        return out


class RecurrentClassifier(_Recurrent):
    """Recurrent net reading a sequence, classifying from the last hidden state."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.trajectory(x)[:, -1])


class RecurrentRegressor(_Recurrent):
    """Recurrent net with a readout at every step (e.g. flip-flop): ``(B, T, out)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.trajectory(x))


def jacobian_with_spectrum(
    D: int, P: int, eigenvalues: torch.Tensor, *, seed: int = 0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """``J = U diag(√λ) Vᵀ`` with Haar-random orthonormal ``U`` (D × r) and ``V`` (P × r).

    ``K = J Jᵀ`` then has exactly the eigenvalues λ (and zeros): kernels of known trace, norm,
    effective rank and spectrum for tests and benchmarks (``NTK.from_jacobian(J)``).
    """
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64)
    r = lam.numel()
    if r > min(D, P):
        raise ValueError(f"{r} eigenvalues do not fit a {D} × {P} Jacobian (rank ≤ {min(D, P)})")
    if (lam < 0).any():
        raise ValueError("NTK eigenvalues must be non-negative")
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(D, r, dtype=torch.float64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(P, r, dtype=torch.float64, generator=g))
    return (U @ torch.diag(lam.sqrt()) @ V.T).to(dtype)
