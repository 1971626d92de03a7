"""The prune-retrain methods that train in phases: iterative magnitude pruning with rewinding
(``imp``) and sparse model soups (``sms``), through ``Pruner.end_phase``: the per-cycle
levels, the rewind point, the soup's average and mask, resuming inside and across cycles."""

import io
import math

import pytest
import torch
from torch import nn

import dpf_ext
from dpf_ext.schedules import Cycles, cycle_levels

PHASE = 6  # steps per phase

pytestmark = pytest.mark.filterwarnings("ignore:.*one threshold over several layers",
                                        "ignore::dpf_ext.nn.UnfinalizedWarning")


def make_model():
    torch.manual_seed(0)
    return dpf_ext.sparsify(nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4)))


def batch(step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(8, 12, generator=g)
    return x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()


def build(method, lr=0.1, **options):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    phases = dpf_ext.methods.make_method(method, **options).phases
    pruner = dpf_ext.Pruner(model, method, 0.9, total_steps=phases * PHASE, optimizer=optimizer,
                            **options)
    return model, optimizer, pruner


def steps(model, optimizer, pruner, n):
    for _ in range(n):
        x, y = batch(pruner.step_count)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step()


def weights(model):
    return [m.weight.detach().clone() for m in model if isinstance(m, nn.Linear)]


def masks(model):
    return [m.mask.clone() for m in model if isinstance(m, nn.Linear)]


def test_the_per_cycle_levels_remove_one_fraction_of_what_remains():
    # 90% in 3 cycles: each keeps 0.1 ** (1/3) = 46.4% of what remains
    assert cycle_levels(0.9, 3) == pytest.approx([1 - 0.1 ** (1 / 3), 1 - 0.1 ** (2 / 3), 0.9])
    assert cycle_levels(0.9, 3)[-1] == 0.9 and cycle_levels(0.5, 1) == [0.5]
    schedule = Cycles(0.9, 3, first_steps=10, cycle_steps=10)
    assert [schedule.sparsity_at(s) for s in (0, 9)] == [0.0, 0.0]
    assert schedule.sparsity_at(10) == pytest.approx(0.5358, abs=1e-4)
    assert schedule.sparsity_at(25) == pytest.approx(0.7846, abs=1e-4)
    assert schedule.sparsity_at(30) == 0.9 == schedule.sparsity_at(1000)
    assert schedule.final_step == 30


def test_imp_prunes_through_the_levels_and_rewinds_to_the_initialisation():
    model, optimizer, pruner = build("imp", cycles=3)
    assert pruner.method.phases == 4
    initial = weights(model)
    levels = cycle_levels(0.9, 3)
    for phase in range(4):
        assert pruner.sparsity() == (0.0 if phase == 0 else pytest.approx(levels[phase - 1], abs=2e-3))
        steps(model, optimizer, pruner, PHASE)
        trained = weights(model)
        ended = pruner.end_phase()
        assert ended["phase"] == ended["cycle"] == phase
        if phase < 3:  # pruned by the trained magnitudes, then rewound: kept weights are initial
            for w, m, w0 in zip(weights(model), masks(model), initial):
                assert torch.equal(w[m], w0[m]) and bool((w[~m] == 0).all())
            assert not optimizer.state  # fresh optimizer state
        else:  # the last phase: nothing moves
            assert all(torch.equal(a, b) for a, b in zip(weights(model), trained))
    assert pruner.sparsity() == pytest.approx(0.9, abs=2e-3)
    with pytest.raises(RuntimeError, match="all 4 phases"):
        pruner.end_phase()


def test_imp_prunes_the_smallest_trained_magnitudes_globally():
    model, optimizer, pruner = build("imp", cycles=1)
    steps(model, optimizer, pruner, PHASE)
    trained = torch.cat([w.reshape(-1) for w in weights(model)]).abs()
    pruner.end_phase()
    kept = torch.cat([m.reshape(-1) for m in masks(model)])
    assert int(kept.sum()) == round(0.1 * kept.numel())
    assert trained[kept].min() >= trained[~kept].max()


def test_imp_rewinds_to_a_fraction_of_the_first_phase_or_keeps_the_weights():
    model, optimizer, pruner = build("imp", cycles=2, rewind=0.5)
    steps(model, optimizer, pruner, PHASE // 2)
    at_rewind = weights(model)
    steps(model, optimizer, pruner, PHASE - PHASE // 2)
    pruner.end_phase()
    for w, m, r in zip(weights(model), masks(model), at_rewind):
        assert torch.equal(w[m], r[m])
    model, optimizer, pruner = build("imp", cycles=2, lr_rewind=True)
    steps(model, optimizer, pruner, PHASE)
    trained = weights(model)
    pruner.end_phase()
    for w, m, t in zip(weights(model), masks(model), trained):
        assert torch.equal(w[m], t[m]) and bool((w[~m] == 0).all())


def test_a_soup_is_the_average_of_its_ingredients_and_keeps_the_mask():
    model, optimizer, pruner = build("sms", cycles=2, soup=3)
    assert pruner.method.phases == 7
    steps(model, optimizer, pruner, PHASE)
    assert pruner.end_phase()["soup"] is False  # pruned to the first level
    start, mask = weights(model), masks(model)
    ingredients = []
    for j in range(3):
        assert all(torch.equal(a, b) for a, b in zip(weights(model), start))  # the same start
        steps(model, optimizer, pruner, PHASE)
        ingredients.append(weights(model))
        ended = pruner.end_phase()
        assert (ended["cycle"], ended["ingredient"], ended["soup"]) == (1, j, j == 2)
    # the soup, then pruned to the last level by its own magnitudes
    for i, (w, m_before) in enumerate(zip(weights(model), mask)):
        average = sum(ing[i] for ing in ingredients) / 3
        m = masks(model)[i]
        torch.testing.assert_close(w[m], average[m], rtol=0, atol=1e-6)
        assert bool((average[~m_before] == 0).all())  # the average kept the mask
        assert bool((m & ~m_before).sum() == 0)  # and pruning only shrinks it
    assert pruner.sparsity() == pytest.approx(0.9, abs=2e-3)


def test_end_phase_says_what_is_wrong():
    model, optimizer, pruner = build("imp", cycles=2)
    steps(model, optimizer, pruner, PHASE - 1)
    with pytest.raises(RuntimeError, match="ends at step 6"):
        pruner.end_phase()
    static = dpf_ext.Pruner(make_model(), "static", 0.5)
    with pytest.raises(RuntimeError, match="one phase"):
        static.end_phase()
    with pytest.raises(ValueError, match="at least 3"):
        dpf_ext.Pruner(make_model(), "imp", 0.9, total_steps=2, cycles=2,
                       optimizer=torch.optim.SGD(make_model().parameters(), lr=0.1))
    with pytest.raises(ValueError, match="rewind must be"):
        dpf_ext.methods.make_method("imp", rewind=1.0)


@pytest.mark.parametrize("method, options, stop", [
    ("imp", {"cycles": 2, "rewind": 0.5}, 2),  # inside the first phase, before the rewind point
    ("imp", {"cycles": 2, "rewind": 0.5}, 9),  # inside the second
    ("sms", {"cycles": 2, "soup": 2}, 14),  # inside a cycle's second ingredient
])
def test_a_run_resumes_exactly_inside_and_across_phases(method, options, stop):
    def run(model, optimizer, pruner, until):
        while pruner.step_count < until:
            steps(model, optimizer, pruner, 1)
            if pruner.step_count % PHASE == 0:
                pruner.end_phase()

    whole = build(method, **options)
    total = whole[2].method.phases * PHASE
    run(*whole, total)
    first = build(method, **options)
    run(*first, stop)
    buffer = io.BytesIO()
    torch.save({"model": first[0].state_dict(), "opt": first[1].state_dict(),
                "pruner": first[2].state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = build(method, **options)
    resumed[0].load_state_dict(saved["model"])
    resumed[1].load_state_dict(saved["opt"])
    resumed[2].load_state_dict(saved["pruner"])
    run(*resumed, total)
    for (k, a), b in zip(whole[0].state_dict().items(), resumed[0].state_dict().values()):
        assert torch.equal(a, b), k
    assert math.isclose(resumed[2].sparsity(), 0.9, abs_tol=2e-3)
