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
    (SGDR, Loshchilov & Hutter 2017), each period ``period_factor`` times longer.
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
            # Periods T, fT, f^2 T, ...: the cycle k holding `elapsed` starts at
            # T (f^k - 1) / (f - 1); closed form, so a call costs O(1) at any step.
            f = self.period_factor
            k = math.floor(math.log1p(elapsed * (f - 1.0) / period) / math.log(f))
            start = period * (f**k - 1.0) / (f - 1.0)
            if start > elapsed:  # guard the floor against rounding at a boundary
                k -= 1
                start = period * (f**k - 1.0) / (f - 1.0)
            elapsed, period = elapsed - start, period * f**k
            if elapsed >= period:
                elapsed, period = elapsed - period, period * f
        else:
            elapsed = min(elapsed, period)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * elapsed / period))


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
