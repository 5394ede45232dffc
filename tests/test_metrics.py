import pytest

from mtlopt.metrics import delta_m, delta_p


def test_delta_m_by_hand_with_the_lower_is_better_sign():
    # error 0.5 → 0.4 (−20 %, better), accuracy 0.80 → 0.60 (−25 %, worse):
    # Δm = ((0.4 − 0.5)/0.5 · (+1) + (0.6 − 0.8)/0.8 · (−1)) / 2 · 100 = (−20 + 25) / 2 = 2.5
    value = delta_m({"err": 0.4, "acc": 0.6}, {"err": 0.5, "acc": 0.8}, {"err": True, "acc": False})
    assert value == pytest.approx(2.5)


def test_delta_m_is_zero_at_the_baseline_and_negative_when_better():
    base = {"a": 2.0, "b": 0.9}
    directions = {"a": True, "b": False}
    assert delta_m(base, base, directions) == 0
    assert delta_m({"a": 1.0, "b": 0.99}, base, directions) < 0


def test_delta_p_averages_per_task_first():
    # Task 1 has two metrics (+10 %, +30 %) → +20 %; task 2 one metric (−10 %) → mean +5 %.
    values = {"m1": 1.1, "m2": 1.3, "m3": 0.9}
    base = {"m1": 1.0, "m2": 1.0, "m3": 1.0}
    higher = {"m1": True, "m2": True, "m3": True}
    assert delta_p(values, base, higher, {"t1": ["m1", "m2"], "t2": ["m3"]}) == pytest.approx(5.0)


def test_bad_input():
    with pytest.raises(KeyError):
        delta_m({"a": 1.0}, {"b": 1.0}, {"a": True})
    with pytest.raises(ZeroDivisionError):
        delta_m({"a": 1.0}, {"a": 0.0}, {"a": True})
    with pytest.raises(ValueError):
        delta_m({}, {}, {})
