import pytest

from dpf_ext.schedules import Constant, Cubic, Linear, OneShot


def test_cubic_endpoints_and_midpoints():
    s = Cubic(final=0.9, begin_step=100, end_step=300)
    assert s.sparsity_at(0) == 0.0
    assert s.sparsity_at(100) == 0.0
    assert s.sparsity_at(300) == pytest.approx(0.9)
    assert s.sparsity_at(10_000) == pytest.approx(0.9)
    # s_f + (s_i - s_f) (1 - 1/2)^3 = 0.9 - 0.9 / 8
    assert s.sparsity_at(200) == pytest.approx(0.7875)
    # a quarter of the way: 0.9 (1 - 0.75^3)
    assert s.sparsity_at(150) == pytest.approx(0.9 * (1 - 0.75**3))


def test_cubic_with_initial_sparsity():
    s = Cubic(final=0.8, begin_step=0, end_step=10, initial=0.2)
    assert s.sparsity_at(0) == pytest.approx(0.2)
    assert s.sparsity_at(5) == pytest.approx(0.8 - 0.6 / 8)
    assert s.sparsity_at(10) == pytest.approx(0.8)


def test_cubic_is_monotone():
    s = Cubic(final=0.95, begin_step=0, end_step=1000)
    values = [s.sparsity_at(t) for t in range(0, 1200, 7)]
    assert values == sorted(values)


def test_linear():
    s = Linear(final=0.5, begin_step=10, end_step=20)
    assert [s.sparsity_at(t) for t in (0, 10, 15, 20, 30)] == pytest.approx([0, 0, 0.25, 0.5, 0.5])


def test_constant_and_oneshot():
    assert Constant(0.7).sparsity_at(0) == Constant(0.7).sparsity_at(10**9) == 0.7
    s = OneShot(0.6, at_step=5)
    assert [s.sparsity_at(t) for t in (0, 4, 5, 6)] == [0.0, 0.0, 0.6, 0.6]


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_outside_unit_interval_is_rejected(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Cubic(bad, 0, 10)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Constant(bad)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        OneShot(bad)


def test_bad_ramp_steps():
    with pytest.raises(ValueError, match="begin_step < end_step"):
        Cubic(0.5, 10, 10)
    with pytest.raises(ValueError, match="at_step"):
        OneShot(0.5, at_step=-1)
