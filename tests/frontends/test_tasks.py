"""Built-in data and models: generated locally, seeded, with the documented shapes."""

from __future__ import annotations

import pytest
import torch

from ntkscope import tasks


def test_digits_split_is_seeded_and_centred() -> None:
    Xtr, ytr, Xte, yte = tasks.digits(100, seed=1)
    assert Xtr.shape == (100, 64) and Xte.shape[1] == 64 and ytr.dtype == torch.int64
    assert torch.equal(tasks.digits(100, seed=1)[0], Xtr) and not torch.equal(tasks.digits(100, seed=2)[0], Xtr)
    full = tasks.digits(seed=1)[0]
    assert full.double().mean(0).abs().max() < 1e-6  # centred on the training statistics
    S = tasks.sequential_digits(10)[0]
    assert S.shape == (10, 8, 8)


def test_flipflop_targets_hold_the_last_pulse() -> None:
    x, y = tasks.flipflop(batch=4, steps=30, bits=2, p=0.2, seed=0)
    assert x.shape == y.shape == (4, 30, 2)
    for b in range(4):
        for c in range(2):
            last = 0.0
            for t in range(30):
                if x[b, t, c] != 0:
                    last = float(x[b, t, c])
                assert float(y[b, t, c]) == last


def test_mnist1d_is_generated_locally_and_restores_global_rngs() -> None:
    import random

    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    Xtr, ytr, Xte, yte = tasks.mnist1d_sequences(100, seed=0)
    assert Xtr.shape[1:] == (40, 1) and len(Xtr) + len(Xte) == 100 and set(ytr.tolist()) <= set(range(10))
    assert random.getstate() == py and np.random.get_state()[1].tolist() == npy[1].tolist()


def test_models_and_known_spectrum() -> None:
    net = tasks.mlp([5, 7, 3], seed=0)
    assert net(torch.randn(2, 5)).shape == (2, 3)
    assert torch.equal(tasks.mlp([5, 7, 3], seed=0)[0].weight, net[0].weight)
    x = torch.randn(2, 6, 3)
    assert tasks.RecurrentRegressor("gru", 3, 8, 2)(x).shape == (2, 6, 2)
    assert tasks.RecurrentClassifier("lstm", 3, 8, 4)(x).shape == (2, 4)
    with pytest.raises(ValueError, match="unknown recurrent kind"):
        tasks.RecurrentClassifier("transformer", 3, 8, 4)
    lam = torch.tensor([3.0, 2.0, 0.5], dtype=torch.float64)
    J = tasks.jacobian_with_spectrum(6, 9, lam, seed=0)
    ev = torch.linalg.eigvalsh(J @ J.T).flip(0)[:3]
    assert torch.allclose(ev, lam, atol=1e-10)
    with pytest.raises(ValueError, match="do not fit"):
        tasks.jacobian_with_spectrum(2, 9, lam)
