#!/usr/bin/env python3
"""Optimizer paths on 2-D test functions: SGD, momentum, RMSProp, AdaGrad and Adam.

Adam is fastadam (``fastadam.adam_step`` on a 2-element float64 parameter); the others are
their textbook update rules in NumPy. Each panel draws the paths over the function's
contours: Rosenbrock's curved valley, Beale's flat plateaus, and a saddle point, where
Adam's per-coordinate step size escapes the flat direction quickly.

    pip install ".[examples]"                                    # matplotlib
    python examples/trajectories.py                              # ./trajectories.png
    python examples/trajectories.py --gif trajectories.gif       # also an animation
    python examples/trajectories.py --out docs/images/trajectories.png   # the docs' picture
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np

import fastadam

from _requirements import require

Vector = np.ndarray


@dataclass
class Problem:
    name: str
    f: Callable[[Vector], float]
    grad: Callable[[Vector], Vector]
    start: Tuple[float, float]
    minimum: Tuple[float, float]
    window: Tuple[float, float, float, float]  # x0, x1, y0, y1
    lrs: Dict[str, float]                      # a learning rate per optimizer
    log_levels: bool = True


def rosenbrock(p):
    x, y = p
    return (1 - x) ** 2 + 100 * (y - x * x) ** 2


def rosenbrock_grad(p):
    x, y = p
    return np.array([-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)])


def beale(p):
    x, y = p
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def beale_grad(p):
    x, y = p
    a, b, c = 1.5 - x + x * y, 2.25 - x + x * y**2, 2.625 - x + x * y**3
    return np.array([2 * a * (y - 1) + 2 * b * (y**2 - 1) + 2 * c * (y**3 - 1),
                     2 * a * x + 2 * b * 2 * x * y + 2 * c * 3 * x * y**2])


def saddle(p):
    x, y = p
    return x * x - y * y


def saddle_grad(p):
    x, y = p
    return np.array([2 * x, -2 * y])


PROBLEMS = [
    Problem("Rosenbrock", rosenbrock, rosenbrock_grad, (-1.5, 2.0), (1.0, 1.0), (-2, 2, -1, 3),
            {"SGD": 1e-3, "momentum": 2e-4, "RMSProp": 1e-2, "AdaGrad": 0.3, "Adam": 0.1}),
    Problem("Beale", beale, beale_grad, (1.0, 1.4), (3.0, 0.5), (-0.5, 4, -1.5, 2),
            {"SGD": 1e-3, "momentum": 1e-3, "RMSProp": 1e-2, "AdaGrad": 0.5, "Adam": 0.05}),
    Problem("saddle x² - y²", saddle, saddle_grad, (1.0, 1e-3), (float("nan"), float("nan")),
            (-1.2, 1.2, -1.2, 1.2), {"SGD": 0.01, "momentum": 0.01, "RMSProp": 0.01,
                                     "AdaGrad": 0.1, "Adam": 0.01}, log_levels=False),
]


def run_optimizer(name: str, problem: Problem, steps: int) -> np.ndarray:
    """The path (steps + 1, 2) of one optimizer from the problem's start."""
    p = np.array(problem.start, dtype=np.float64)
    lr = problem.lrs[name]
    velocity, accumulator = np.zeros(2), np.zeros(2)
    state = fastadam.adam_state(p)
    path = [p.copy()]
    for t in range(1, steps + 1):
        g = problem.grad(p)
        if name == "SGD":
            p -= lr * g
        elif name == "momentum":
            velocity = 0.9 * velocity + g
            p -= lr * velocity
        elif name == "RMSProp":
            accumulator = 0.9 * accumulator + 0.1 * g * g
            p -= lr * g / (np.sqrt(accumulator) + 1e-8)
        elif name == "AdaGrad":
            accumulator += g * g
            p -= lr * g / (np.sqrt(accumulator) + 1e-8)
        else:  # Adam: fastadam's kernel
            fastadam.adam_step(p, g, state["exp_avg"], state["exp_avg_sq"], step=t, lr=lr)
        if not np.all(np.isfinite(p)) or np.abs(p).max() > 1e6:
            break  # diverged: keep the path up to here
        path.append(p.copy())
    return np.array(path)


OPTIMIZERS = ["SGD", "momentum", "RMSProp", "AdaGrad", "Adam"]
COLORS = {"SGD": "tab:gray", "momentum": "tab:blue", "RMSProp": "tab:green",
          "AdaGrad": "tab:orange", "Adam": "tab:red"}


def all_paths(steps: int) -> List[Dict[str, np.ndarray]]:
    return [{name: run_optimizer(name, problem, steps) for name in OPTIMIZERS} for problem in PROBLEMS]


def draw_background(ax, problem: Problem) -> None:
    x0, x1, y0, y1 = problem.window
    xs, ys = np.meshgrid(np.linspace(x0, x1, 300), np.linspace(y0, y1, 300))
    zs = problem.f(np.array([xs, ys]))
    if problem.log_levels:
        levels = np.logspace(np.log10(max(zs.min(), 1e-3)), np.log10(zs.max()), 25)
        ax.contour(xs, ys, zs, levels=levels, cmap="Greys", linewidths=0.6)
    else:
        ax.contour(xs, ys, zs, levels=25, cmap="Greys", linewidths=0.6)
    if np.isfinite(problem.minimum[0]):
        ax.plot(*problem.minimum, marker="*", color="gold", markersize=14, markeredgecolor="k", zorder=5)
    ax.plot(*problem.start, marker="o", color="k", markersize=5, zorder=5)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_title(problem.name)


def draw(paths: List[Dict[str, np.ndarray]], steps: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PROBLEMS), figsize=(5 * len(PROBLEMS), 4.6))
    for ax, problem, problem_paths in zip(axes, PROBLEMS, paths):
        draw_background(ax, problem)
        for name, points in problem_paths.items():
            label = f"{name} (lr {problem.lrs[name]:g})"
            ax.plot(points[:, 0], points[:, 1], color=COLORS[name], lw=1.6, label=label)
            ax.plot(*points[-1], marker="o", color=COLORS[name], markersize=4)
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{steps} steps from the black dot; Adam is fastadam.adam_step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def animate(paths: List[Dict[str, np.ndarray]], steps: int, path: str, frames: int = 60) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation, PillowWriter

    fig, axes = plt.subplots(1, len(PROBLEMS), figsize=(5 * len(PROBLEMS), 4.6))
    lines = []
    for ax, problem in zip(axes, PROBLEMS):
        draw_background(ax, problem)
        lines.append({name: ax.plot([], [], color=COLORS[name], lw=1.6, label=name)[0] for name in OPTIMIZERS})
        ax.legend(fontsize=7, loc="lower left")

    def update(frame):
        upto = 1 + (steps * (frame + 1)) // frames
        for problem_lines, problem_paths in zip(lines, paths):
            for name, line in problem_lines.items():
                line.set_data(problem_paths[name][:upto, 0], problem_paths[name][:upto, 1])
        return [line for group in lines for line in group.values()]

    FuncAnimation(fig, update, frames=frames, blit=True).save(path, writer=PillowWriter(fps=12))
    plt.close(fig)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps per path (default 1000)")
    parser.add_argument("--out", default="trajectories.png",
                        help="the PNG to write (default: trajectories.png in the current directory)")
    parser.add_argument("--gif", help="also write an animated GIF here")
    args = parser.parse_args()
    require("matplotlib")  # before the work, with the install line if it is missing
    for path in (args.out, args.gif):
        if path:
            Path(path).resolve().parent.mkdir(parents=True, exist_ok=True)
    paths = all_paths(args.steps)
    for problem, problem_paths in zip(PROBLEMS, paths):
        finals = ", ".join(f"{name} {problem.f(points[-1]):.3g}" for name, points in problem_paths.items())
        print(f"{problem.name}: f at the end: {finals}")
    draw(paths, args.steps, args.out)
    if args.gif:
        animate(paths, args.steps, args.gif)


if __name__ == "__main__":
    main()
