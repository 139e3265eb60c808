"""Learning-rate schedules: plain callables ``step -> lr`` for ``Adam(lr=...)``.

``step`` is the 1-based number of the step being taken (the optimizer calls the
schedule once per param group per step). Every schedule validates its arguments,
has a readable repr, and composes with :func:`linear_warmup`.

>>> from fastadam import schedules
>>> schedules.inverse_sqrt(0.1)(4)          # the paper's alpha / sqrt(t)
0.05
>>> schedules.linear_warmup(schedules.cosine(1e-3, 1000), warmup_steps=100)
linear_warmup(schedule=cosine(lr=0.001, decay_steps=1000, min_lr=0.0), warmup_steps=100)
"""

from __future__ import annotations

import math
import numbers
from typing import Callable

from fastadam._validation import check_at_least, check_real, check_step

__all__ = [
    "Schedule",
    "constant",
    "cosine",
    "exponential",
    "inverse_sqrt",
    "inverse_time",
    "linear_warmup",
    "step_decay",
]


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive integer, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return int(value)


class Schedule:
    """Base of the schedules: ``schedule(step)`` checks the step and calls ``value``."""

    def __call__(self, step: int) -> float:
        try:
            return self.value(check_step(step))
        except OverflowError:  # e.g. a growth factor > 1 after many steps: reported as
            return math.inf    # a non-finite lr by the optimizer, naming the group

    def value(self, step: int) -> float:
        raise NotImplementedError

    def _arguments(self) -> dict:
        return dict(vars(self))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._arguments().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(map(repr, vars(self).items())))))


class constant(Schedule):
    """``lr`` at every step."""

    def __init__(self, lr: float):
        self.lr = check_at_least(lr, "lr", 0.0)

    def value(self, step: int) -> float:
        return self.lr


class inverse_sqrt(Schedule):
    """``lr / sqrt(step)``: the step-size decay of Kingma & Ba's convergence analysis
    (section 4) and of their logistic-regression experiment (section 6.1)."""

    def __init__(self, lr: float):
        self.lr = check_at_least(lr, "lr", 0.0)

    def value(self, step: int) -> float:
        return self.lr / math.sqrt(step)


class inverse_time(Schedule):
    """``lr / (1 + decay_rate * step / decay_steps)`` (Keras's InverseTimeDecay)."""

    def __init__(self, lr: float, decay_rate: float, decay_steps: int = 1):
        self.lr = check_at_least(lr, "lr", 0.0)
        self.decay_rate = check_at_least(decay_rate, "decay_rate", 0.0)
        self.decay_steps = _positive_int(decay_steps, "decay_steps")

    def value(self, step: int) -> float:
        return self.lr / (1.0 + self.decay_rate * step / self.decay_steps)


class exponential(Schedule):
    """``lr * decay_rate ** (step / decay_steps)``; with ``staircase=True`` the exponent
    is an integer (``step // decay_steps``)."""

    def __init__(self, lr: float, decay_rate: float, decay_steps: int = 1, staircase: bool = False):
        self.lr = check_at_least(lr, "lr", 0.0)
        self.decay_rate = check_at_least(decay_rate, "decay_rate", 0.0, strict=True)
        self.decay_steps = _positive_int(decay_steps, "decay_steps")
        if not isinstance(staircase, bool):
            raise TypeError(f"staircase must be a bool, got {type(staircase).__name__}")
        self.staircase = staircase

    def value(self, step: int) -> float:
        exponent = step // self.decay_steps if self.staircase else step / self.decay_steps
        return self.lr * self.decay_rate**exponent


class step_decay(Schedule):
    """``lr * gamma ** ((step - 1) // step_size)``: steps 1..step_size use ``lr``, the
    next step_size ``lr * gamma``, and so on (PyTorch's StepLR)."""

    def __init__(self, lr: float, step_size: int, gamma: float = 0.1):
        self.lr = check_at_least(lr, "lr", 0.0)
        self.step_size = _positive_int(step_size, "step_size")
        self.gamma = check_at_least(gamma, "gamma", 0.0)

    def value(self, step: int) -> float:
        return self.lr * self.gamma ** ((step - 1) // self.step_size)


class cosine(Schedule):
    """Cosine annealing from ``lr`` (step 1) to ``min_lr`` (step ``decay_steps + 1``).

    Without restarts it then stays at ``min_lr``. With ``restarts=True`` it starts over
    (SGDR, Loshchilov & Hutter 2017), each period ``period_factor`` times longer: with
    ``T = decay_steps`` and ``f = period_factor``, cycle k (from 0) starts after
    ``T (1 + f + ... + f**(k-1))`` steps and lasts ``T f**k``; its first step has ``lr``.
    The factor is the number as written: ``period_factor=1.1`` restarts after 100, 210
    and 331 steps for T = 100, although the double nearest 1.1 is a little larger (a
    cycle boundary computed in double precision within a relative 1e-9 of a whole
    step is that step).
    """

    def __init__(self, lr: float, decay_steps: int, min_lr: float = 0.0, restarts: bool = False,
                 period_factor: float = 1.0):
        self.lr = check_at_least(lr, "lr", 0.0)
        self.decay_steps = _positive_int(decay_steps, "decay_steps")
        self.min_lr = check_at_least(min_lr, "min_lr", 0.0)
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr must be <= lr ({self.lr!r}), got {self.min_lr!r}")
        if not isinstance(restarts, bool):
            raise TypeError(f"restarts must be a bool, got {type(restarts).__name__}")
        self.restarts = restarts
        self.period_factor = check_at_least(period_factor, "period_factor", 1.0)

    def _arguments(self) -> dict:
        args = {"lr": self.lr, "decay_steps": self.decay_steps, "min_lr": self.min_lr}
        if self.restarts:
            args.update(restarts=True, period_factor=self.period_factor)
        return args

    def value(self, step: int) -> float:
        elapsed, period = float(step - 1), float(self.decay_steps)
        if self.restarts and self.period_factor == 1.0:
            elapsed = elapsed % period
        elif self.restarts:
            elapsed, period = self._position_in_cycle(elapsed, period)
        else:
            elapsed = min(elapsed, period)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * elapsed / period))

    # A cycle boundary this close (relative) to a whole number of steps is that step.
    BOUNDARY_TOLERANCE = 1e-9

    def _position_in_cycle(self, elapsed: float, period: float) -> tuple:
        """(steps into the current cycle, its length) for periods T, fT, f^2 T, ...: cycle
        k starts at S_k = T (f^k - 1) / (f - 1). Closed form, so a call costs O(1) at any
        step; then k is moved (by one, at most a few times) until S_k <= elapsed <
        S_{k+1}, each comparison with the boundary tolerance. Without it, rounding put step
        332 of cosine(T=100, f=1.1) at the very end of cycle 2 (rate 0.0) instead of the
        start of cycle 3 (rate lr): S_3 = 331.00000000000006 in doubles (issue 19, item 8)."""
        f = self.period_factor

        def power(k: int) -> float:
            try:
                return f**k
            except OverflowError:  # (Python's float power raises where C's gives inf)
                return math.inf

        def start(k: int) -> float:
            return period * (power(k) - 1.0) / (f - 1.0)

        def reached(boundary: float) -> bool:
            return elapsed >= boundary - self.BOUNDARY_TOLERANCE * max(1.0, boundary)

        x = elapsed / period * (f - 1.0)
        estimate = (math.log1p(x) if math.isfinite(x)  # (else in logs: a huge factor)
                    else math.log(elapsed / period) + math.log(f - 1.0)) / math.log(f)
        k = max(0, math.floor(estimate))
        for _ in range(64):  # the estimate is off by one at most, in practice
            if k > 0 and not reached(start(k)):
                k -= 1
            elif reached(start(k + 1)):
                k += 1
            else:
                break
        # A boundary just above a whole step, reached by the tolerance, gives a start a
        # hair above elapsed: the cycle's first step is then exactly 0 steps in.
        return max(0.0, elapsed - start(k)), period * power(k)


class linear_warmup(Schedule):
    """Ramp linearly up to ``schedule`` over ``warmup_steps``, then follow it.

    Steps ``1..warmup_steps`` give ``peak * step / warmup_steps`` with ``peak =
    schedule(1)``; step ``warmup_steps + k`` gives ``schedule(k)``, so the wrapped
    schedule starts where the warm-up ends. ``schedule`` may be a float (constant).
    """

    def __init__(self, schedule: "Callable[[int], float] | float", warmup_steps: int):
        if not callable(schedule):
            schedule = constant(check_real(schedule, "schedule"))
        self.schedule = schedule
        self.warmup_steps = _positive_int(warmup_steps, "warmup_steps")

    def value(self, step: int) -> float:
        if step <= self.warmup_steps:
            return self.schedule(1) * step / self.warmup_steps
        return self.schedule(step - self.warmup_steps)
