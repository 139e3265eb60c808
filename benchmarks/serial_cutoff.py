#!/usr/bin/env python3
"""Where do two threads start to pay? Times the kernel entry point directly (bypassing
fastadam's own serial cutoff) with 1 and 2 threads per size; medians of interleaved
repeats. The answer sets fastadam._threads.SERIAL_CUTOFF.

    python benchmarks/serial_cutoff.py [--dtype float64]
"""

import argparse

import numpy as np

from fastadam import _kernels
from fastadam._validation import check_hyperparameters
from fastadam.app.timing import make_buffers, measure

HYPER = check_hyperparameters(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                              decoupled_weight_decay=False, amsgrad=False, maximize=False,
                              eps_hat=False, eps_root=0.0)


def kernel_runner(buffers, threads):
    def run():
        _kernels.adam_step(*buffers, None, HYPER, 1.0, 1.0, threads)
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    print("| elements | 1 thread (us) | 2 threads (us) | 2 threads speed-up |")
    print("|---:|---:|---:|---:|")
    for log2 in range(12, 20):
        buffers = make_buffers(1 << log2, np.dtype(args.dtype))
        times = measure({t: kernel_runner(buffers, t) for t in (1, 2)}, args.repeats, 0.01)
        print(f"| 2^{log2} | {times[1] * 1e6:.1f} | {times[2] * 1e6:.1f} | {times[1] / times[2]:.2f}x |")


if __name__ == "__main__":
    main()
