"""The ``"auto"`` crossover: measured per machine, cached, fixed by the environment."""

import json

import pytest
import torch
from torch import nn

import dpf_ext
from dpf_ext import ops
from dpf_ext.nn import crossover


def test_equal_cost_density_is_where_the_ratio_crosses_one():
    assert crossover.GRID == (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
    # between 0.2 (0.8) and 0.3 (1.2): 0.2 + 0.1 * (1 - 0.8) / 0.4
    assert crossover.equal_cost_density([0.4, 0.5, 0.8, 1.2, 1.5, 2.0]) == pytest.approx(0.25)
    assert crossover.equal_cost_density([1.0, 1.2, 1.4, 1.6, 1.8, 2.0]) == 0.0
    assert crossover.equal_cost_density([0.1, 0.2, 0.3, 0.4, 0.5, 0.9]) == 0.5
    # the first crossing counts: a noisy dip above it does not move it
    assert crossover.equal_cost_density([0.5, 1.5, 0.9, 1.2, 1.5, 2.0]) == pytest.approx(0.075)
    with pytest.raises(ValueError, match="one ratio per density"):
        crossover.equal_cost_density([0.5, 1.5])


def test_the_environment_fixes_the_crossover(monkeypatch):
    monkeypatch.setenv(crossover.ENV, "linear=0.5,conv=0.25")
    assert crossover.crossover() == crossover.Crossover(0.5, 0.25, crossover.ENV)
    for bad in ("linear=0.5", "linear=2,conv=0.1", "linear=x,conv=0.1", "dense=0.1,conv=0.1"):
        monkeypatch.setenv(crossover.ENV, bad)
        with pytest.raises(ValueError, match=crossover.ENV):
            crossover.crossover()


@pytest.mark.skipif(ops.simd() == "none", reason="auto runs sparse only with the compiled kernels")
def test_auto_follows_the_crossover(monkeypatch):
    model = dpf_ext.sparsify(nn.Sequential(nn.Linear(256, 256)), compute="auto")
    dpf_ext.Pruner(model, "static", 0.7, seed=0)  # density 0.3
    monkeypatch.setenv(crossover.ENV, "linear=0.35,conv=0.3")
    assert dpf_ext.compute_report(model) == {"0": "sparse"}
    monkeypatch.setenv(crossover.ENV, "linear=0.25,conv=0.3")
    assert dpf_ext.compute_report(model) == {"0": "dense"}


def test_a_measurement_is_cached_per_machine(monkeypatch, tmp_path):
    monkeypatch.delenv(crossover.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    state = torch.get_rng_state()
    found = crossover.crossover()
    assert torch.equal(torch.get_rng_state(), state)  # its own generator
    assert found.source == "measured"
    assert 0.0 <= found.linear <= 0.5 and 0.0 <= found.conv <= 0.5
    if ops.simd() == "none":
        assert (found.linear, found.conv) == (0.0, 0.0)
    stored = json.loads((tmp_path / "dpf_ext" / "crossover.json").read_text())
    key = crossover.machine_key()
    assert crossover.cpu_name() in key and f"{torch.get_num_threads()} thread(s)" in key
    assert stored[key]["linear"] == found.linear and stored[key]["conv"] == found.conv

    # another process on this machine reads it (here: another cache directory, same key)
    other = tmp_path / "other"
    (other / "dpf_ext").mkdir(parents=True)
    (other / "dpf_ext" / "crossover.json").write_text(
        json.dumps({key: {"linear": 0.125, "conv": 0.375}}))
    monkeypatch.setenv("XDG_CACHE_HOME", str(other))
    assert crossover.crossover() == crossover.Crossover(0.125, 0.375, "cached")


def test_an_unwritable_cache_costs_only_a_new_measurement(monkeypatch, tmp_path):
    monkeypatch.delenv(crossover.ENV)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    assert crossover.crossover().source == "measured"
