#!/usr/bin/env python3
"""fastadam in one minute: fit a logistic-regression classifier with fastadam.adam_step.

NumPy computes the loss and gradient; fastadam updates the weights in place. At the end
the same training runs with a plain NumPy Adam to show the two agree. For speed, see
benchmarks/quick.py.

    python examples/quickstart.py
"""

import numpy as np

import fastadam


def make_data(n=20_000, features=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features)).astype(np.float32)
    true_w = rng.standard_normal(features).astype(np.float32)
    y = (x @ true_w + 0.5 * rng.standard_normal(n) > 0).astype(np.float32)
    return x, y


def loss_and_grad(w, x, y):
    p = 1.0 / (1.0 + np.exp(-(x @ w)))
    eps = 1e-7
    loss = -np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps))
    return loss, (x.T @ (p - y) / len(y)).astype(np.float32), p


def numpy_adam(w, g, m, v, t, lr, b1=0.9, b2=0.999, eps=1e-8):
    m[:] = b1 * m + (1 - b1) * g
    v[:] = b2 * v + (1 - b2) * g * g
    w -= lr / (1 - b1**t) * m / (np.sqrt(v) / np.sqrt(1 - b2**t) + eps)


def train(x, y, update, steps=300, lr=0.05, batch=512):
    w = np.zeros(x.shape[1], np.float32)
    m, v = np.zeros_like(w), np.zeros_like(w)
    rng = np.random.default_rng(1)
    for t in range(1, steps + 1):
        idx = rng.integers(0, len(y), batch)
        loss, grad, _ = loss_and_grad(w, x[idx], y[idx])
        update(w, grad, m, v, t, lr)
        if t % 100 == 0 and update is fastadam_update:
            print(f"  step {t:4d}  minibatch loss {loss:.4f}")
    return w


def fastadam_update(w, g, m, v, t, lr):
    fastadam.adam_step(w, g, m, v, step=t, lr=lr)


def main():
    fastadam.show_config()
    x, y = make_data()
    print("\ntraining logistic regression with fastadam.adam_step ...")
    w = train(x, y, fastadam_update)
    loss, _, p = loss_and_grad(w, x, y)
    accuracy = np.mean((p > 0.5) == (y > 0.5))
    print(f"full-data loss {loss:.4f}, accuracy {accuracy:.3f}")
    w_ref = train(x, y, numpy_adam)
    print(f"largest weight difference vs a NumPy Adam: {np.max(np.abs(w - w_ref)):.2e}")


if __name__ == "__main__":
    main()
