"""Weight sets shared by the op tests of every backend (random and adversarial), and the
check shared by the sparse-compute tests."""

from __future__ import annotations

import pytest
import torch


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def weight_cases(dtype: torch.dtype = torch.float32) -> dict[str, list[torch.Tensor]]:
    """Named lists of weight tensors: random shapes and scales, ties, zeros, -0.0,
    denormals, huge ranges, empty and non-contiguous tensors."""
    g = _gen(0)
    randn = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    cases = {
        "random_mixed_shapes": [randn(64, 3, 3, 3), randn(10, 64), randn(7), randn(1, 1)],
        "ties": [torch.randint(-3, 4, (300,), generator=g).float(),
                 torch.randint(-3, 4, (17, 5), generator=g).float()],
        "all_zeros": [torch.zeros(50), torch.zeros(3, 4)],
        "mostly_zeros": [torch.where(torch.rand(400, generator=g) < 0.9, 0.0, randn(400))],
        "signed_zeros": [torch.tensor([0.0, -0.0, 1.0, -1.0, -0.0, 2.0, 0.0, -2.0])],
        "denormals": [randn(200) * 1e-40, randn(50) * 1e-45, randn(20)],
        "huge_range": [randn(100) * 1e-30, randn(100), randn(100) * 1e30],
        "with_empty": [torch.empty(0), randn(33), torch.empty(0, 5), randn(2, 2)],
        "single": [torch.tensor([-3.5])],
        "non_contiguous": [randn(20, 30).t(), randn(8, 6, 4)[:, ::2, :]],
        "one_hot_scale": [torch.full((100,), 1.0), torch.full((10,), 1.0 + 2**-20)],
    }
    if dtype != torch.float32:
        cases = {
            name: [w.to(dtype) for w in ws]
            for name, ws in cases.items()
            if name not in ("denormals", "huge_range")  # outside float16's range
        }
        cases["low_precision_range"] = [randn(100).to(dtype) * 1e-3, randn(100).to(dtype) * 100]
    return cases


def concat_magnitudes(weights: list[torch.Tensor]) -> torch.Tensor:
    """|w| of every tensor, widened to float32 and concatenated (what the ops avoid)."""
    return torch.cat([w.detach().abs().float().flatten() for w in weights])


def kth_largest(weights: list[torch.Tensor], k: int) -> torch.Tensor:
    """The k-th largest |w| by torch.kthvalue on the concatenated magnitudes."""
    mags = concat_magnitudes(weights)
    return mags.kthvalue(mags.numel() - k + 1).values


def ks_for(n: int) -> list[int]:
    """Thresholds ranks worth testing for n weights: the ends, the middle, odd spots."""
    return sorted({1, min(2, n), n // 3 or 1, n // 2 or 1, max(n - 1, 1), n})


def train_steps(model, method, steps, batch, **options) -> list[float]:
    """``steps`` SGD steps of ``model`` under ``Pruner(model, method, 0.8, ...)`` on the
    batches ``batch(generator)`` gives (inputs, class labels); the losses."""
    import dpf_ext

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = dpf_ext.Pruner(model, method, 0.8, total_steps=steps * 2, optimizer=optimizer,
                            seed=3, **options)
    g = _gen(4)
    losses = []
    for _ in range(steps):
        x, y = batch(g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pruner.step()
        losses.append(float(loss.detach()))
    return losses


def assert_same_training(dense_run, sparse_run) -> None:
    """Two runs ``(losses, model)`` of one recipe, with dense and with sparse products, end
    with equal masks and losses and weights equal to float tolerance."""
    (dense_losses, dense), (sparse_losses, sparse) = dense_run, sparse_run
    assert sparse_losses == pytest.approx(dense_losses, rel=1e-5, abs=1e-6)
    for (name, a), b in zip(dense.state_dict().items(), sparse.state_dict().values()):
        if name.endswith("mask"):
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def assert_resume_is_exact(build, batch, x) -> None:
    """8 steps of ``build()``'s ``(model, optimizer, pruner)`` against 4, a checkpoint of all
    three, and 4 more in fresh objects: the same outputs on ``x``, bit for bit. ``batch(g)``
    gives each step's inputs and class labels."""
    import copy

    def steps(model, optimizer, pruner, start, stop):
        for step in range(start, stop):
            inputs, labels = batch(_gen(step))
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(inputs), labels).backward()
            optimizer.step()
            pruner.step()

    straight, first, again = build(), build(), build()
    steps(*straight, 0, 8)
    steps(*first, 0, 4)
    for part, state in zip(again, [copy.deepcopy(p.state_dict()) for p in first]):
        part.load_state_dict(state)
    steps(*again, 4, 8)
    torch.testing.assert_close(again[0](x), straight[0](x), rtol=0, atol=0)
