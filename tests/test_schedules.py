"""fastadam.schedules: values, reprs, validation, composition."""

import math
from fractions import Fraction

import numpy as np
import pytest

from fastadam import schedules


@pytest.mark.parametrize("schedule, expected", [
    (schedules.constant(0.1), {1: 0.1, 1000: 0.1}),
    (schedules.inverse_sqrt(0.1), {1: 0.1, 4: 0.05, 100: 0.01}),
    (schedules.inverse_time(0.1, decay_rate=0.5), {1: 0.1 / 1.5, 2: 0.05, 10: 0.1 / 6}),
    (schedules.inverse_time(0.1, decay_rate=1.0, decay_steps=10), {10: 0.05, 30: 0.025}),
    (schedules.exponential(1.0, decay_rate=0.5, decay_steps=2), {2: 0.5, 3: 0.5**1.5, 4: 0.25}),
    (schedules.exponential(1.0, decay_rate=0.5, decay_steps=2, staircase=True), {3: 0.5, 4: 0.25}),
    (schedules.step_decay(1.0, step_size=10, gamma=0.5), {1: 1.0, 10: 1.0, 11: 0.5, 21: 0.25}),
    (schedules.cosine(1.0, decay_steps=10), {1: 1.0, 6: 0.5, 11: 0.0, 500: 0.0}),
    (schedules.cosine(1.0, decay_steps=10, min_lr=0.2), {1: 1.0, 6: 0.6, 11: 0.2}),
    (schedules.cosine(1.0, decay_steps=10, restarts=True), {1: 1.0, 6: 0.5, 11: 1.0, 16: 0.5}),
    (schedules.cosine(1.0, decay_steps=10, restarts=True, period_factor=2.0), {11: 1.0, 21: 0.5, 31: 1.0}),
    (schedules.linear_warmup(0.1, warmup_steps=10), {1: 0.01, 5: 0.05, 10: 0.1, 11: 0.1}),
    (schedules.linear_warmup(schedules.cosine(1.0, decay_steps=10), warmup_steps=4),
     {1: 0.25, 4: 1.0, 5: 1.0, 10: 0.5, 15: 0.0}),
])
def test_values(schedule, expected):
    for step, value in expected.items():
        assert math.isclose(schedule(step), value, rel_tol=1e-12, abs_tol=1e-15), (step, schedule(step))


@pytest.mark.parametrize("schedule, text", [
    (schedules.inverse_sqrt(0.001), "inverse_sqrt(lr=0.001)"),
    (schedules.cosine(0.001, 1000), "cosine(lr=0.001, decay_steps=1000, min_lr=0.0)"),
    (schedules.linear_warmup(schedules.constant(0.1), 5),
     "linear_warmup(schedule=constant(lr=0.1), warmup_steps=5)"),
    (schedules.step_decay(0.1, 30), "step_decay(lr=0.1, step_size=30, gamma=0.1)"),
])
def test_readable_repr(schedule, text):
    assert repr(schedule) == text


def test_equality():
    assert schedules.cosine(0.1, 10) == schedules.cosine(0.1, 10)
    assert schedules.cosine(0.1, 10) != schedules.cosine(0.1, 11)
    assert len({schedules.constant(0.1), schedules.constant(0.1)}) == 1


@pytest.mark.parametrize("factory, exc, match", [
    (lambda: schedules.constant(-0.1), ValueError, "^lr must be >= 0.0"),
    (lambda: schedules.constant("0.1"), TypeError, "^lr must be a real number"),
    (lambda: schedules.inverse_time(0.1, decay_rate=-1), ValueError, "^decay_rate must be >= 0.0"),
    (lambda: schedules.exponential(0.1, decay_rate=0.0), ValueError, "^decay_rate must be > 0.0"),
    (lambda: schedules.exponential(0.1, 0.5, decay_steps=0), ValueError, "^decay_steps must be a positive integer"),
    (lambda: schedules.step_decay(0.1, step_size=2.5), TypeError, "^step_size must be a positive integer"),
    (lambda: schedules.cosine(0.1, 10, min_lr=0.5), ValueError, r"^min_lr must be <= lr"),
    (lambda: schedules.cosine(0.1, 10, restarts=True, period_factor=0.5), ValueError, "^period_factor must be >= 1.0"),
    (lambda: schedules.linear_warmup(0.1, warmup_steps=0), ValueError, "^warmup_steps must be a positive integer"),
])
def test_bad_arguments(factory, exc, match):
    with pytest.raises(exc, match=match):
        factory()


@pytest.mark.parametrize("step, exc", [(0, ValueError), (-3, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_steps(step, exc):
    with pytest.raises(exc, match="^step must be"):
        schedules.inverse_sqrt(0.1)(step)


def test_integer_arguments_accept_numpy_integers():
    assert schedules.step_decay(1.0, step_size=np.int64(10)).step_size == 10


def reference_cosine_restarts(lr, decay_steps, factor, step):
    elapsed, period = float(step - 1), float(decay_steps)
    while elapsed >= period:
        elapsed -= period
        period *= factor
    return 0.5 * lr * (1.0 + math.cos(math.pi * elapsed / period))


@pytest.mark.parametrize("factor", [1.0, 1.5, 2.0, 3.0])
def test_cosine_restarts_closed_form_matches_the_definition(factor):
    schedule = schedules.cosine(1.0, decay_steps=7, restarts=True, period_factor=factor)
    for step in list(range(1, 400)) + [10**4, 10**5 + 3]:
        assert math.isclose(schedule(step), reference_cosine_restarts(1.0, 7, factor, step),
                            rel_tol=1e-9, abs_tol=1e-12), step


def exact_cycle_starts(decay_steps, factor, count):
    """The first ``count`` cycle starts (elapsed steps), in exact rational arithmetic with
    the factor as written in decimal, by a plain loop."""
    f, period, start, starts = Fraction(repr(factor)), Fraction(decay_steps), Fraction(0), []
    for _ in range(count):
        starts.append(start)
        start += period
        period *= f
    return starts


def reference_by_loop(lr, decay_steps, factor, step):
    """The rate at ``step`` by the definition, in a plain loop over exact cycles."""
    elapsed, period, f = Fraction(step - 1), Fraction(decay_steps), Fraction(repr(factor))
    while elapsed >= period:
        elapsed -= period
        period *= f
    return 0.5 * lr * (1.0 + math.cos(math.pi * float(elapsed / period)))


@pytest.mark.parametrize("factor", [1.1, 1.2, 1.3, 1.05, 1.5, 2.0, 2.5, 3.0])
@pytest.mark.parametrize("decay_steps", [1, 7, 10, 100, 1000])
def test_cosine_restarts_at_every_cycle_boundary(factor, decay_steps):
    # Issue 19, item 8: cosine(T=100, restarts=True, period_factor=1.1) gave 0.0 at step
    # 332, where a cycle starts (100 + 110 + 121 = 331 steps in) and the rate is lr. The
    # double nearest 1.1 is a little larger, and the closed form put the boundary at
    # 331.00000000000006 steps.
    schedule = schedules.cosine(1.0, decay_steps=decay_steps, restarts=True, period_factor=factor)
    for start in exact_cycle_starts(decay_steps, factor, 12):
        if start > 10**6:
            break
        first = math.ceil(start) + 1  # the cycle's first step (1-based)
        if start.denominator == 1:  # a boundary on a whole step: the rate is lr there
            assert schedule(first) == 1.0, (first, float(start))
        for step in (first - 1, first, first + 1):
            if step >= 1:
                assert math.isclose(schedule(step), reference_by_loop(1.0, decay_steps, factor, step),
                                    rel_tol=1e-9, abs_tol=1e-9), (step, float(start))


def test_cosine_restarts_cost_does_not_grow_with_step():
    schedule = schedules.cosine(1.0, decay_steps=1, restarts=True)
    assert 0.0 <= schedule(10**15) <= 1.0  # a loop over restarts would never return


def test_overflowing_schedules_return_inf():
    assert schedules.exponential(1.0, decay_rate=10.0)(10**6) == math.inf
