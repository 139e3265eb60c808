#!/usr/bin/env python
"""Run PyTorch's own optimizer tests against fastadam.torch (issue 18; optional, not CI).

PyTorch's ``test/test_optim.py`` holds ``TestOptimRenewed``, parametrised over the
OptimizerInfo entries of ``torch.testing._internal.common_optimizers.optim_db`` (which
ships in the torch wheel; the test file does not, and is not part of this repository:
give its path). This script keeps only the Adam and AdamW entries, points their
``optim_cls`` at ``fastadam.torch.Adam``/``AdamW`` (or leaves torch's own classes, with
``--optimizer torch``, the control that proves the harness), instantiates the tests for
the CPU only, runs them with unittest and prints the counts.

``differentiable=True`` is refused by fastadam.torch by design (autograd through the
update). The configurations that torch's tests build with it (the "global cliquey
kwargs" helper adds one per input) are taken out of those tests and declared expected
refusals: for each one the script checks, inside the test, that the fastadam class
raises ValueError naming ``differentiable``; accepting it fails the test. Every other
configuration of the test still runs.

The other test classes that test_optim.py imports (TestLRScheduler, TestSWAUtils,
TestDifferentiableOptimizer, from test/optim/) are stubbed out: they do not concern
Adam's optim_db entries.

    python setup.py build_ext --inplace
    PYTHONPATH=src python tools/torch_optim_suite.py /path/to/pytorch/test/test_optim.py
    PYTHONPATH=src python tools/torch_optim_suite.py /path/to/test_optim.py --optimizer torch
    ... -k test_errors -k state_dict -v          (substring filters, verbose)
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import time
import types
import unittest
from typing import Any, Dict, List, Tuple


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("test_file", help="path to PyTorch's test/test_optim.py")
    parser.add_argument("--optimizer", choices=("fastadam", "torch"), default="fastadam",
                        help="classes under test: fastadam.torch (default) or torch.optim "
                             "(the control)")
    parser.add_argument("-k", dest="patterns", action="append", default=[],
                        help="run only tests whose name contains this (repeatable: any)")
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per test")
    parser.add_argument("--list", action="store_true", help="list the tests and exit")
    return parser.parse_args()


def _stub_sibling_modules() -> None:
    """test_optim.py imports test classes from test/optim/ (TestLRScheduler, TestSWAUtils,
    TestDifferentiableOptimizer; older versions TestOptim too) into its namespace:
    stand-ins that are not TestCases keep them out of the run."""
    package = types.ModuleType("optim")
    package.__path__ = []  # a package, so the submodule imports resolve
    sys.modules["optim"] = package
    for module in ("test_lrscheduler", "test_optim", "test_swa_utils"):
        stub = types.ModuleType(f"optim.{module}")
        stub.__getattr__ = lambda name: type(name, (), {})  # any name it imports
        sys.modules[f"optim.{module}"] = stub
        setattr(package, module, stub)


class Refusals:
    """The differentiable=True configurations taken out of the tests, each checked to
    be refused."""

    def __init__(self) -> None:
        self.seen: Dict[Tuple[str, str], int] = {}

    def check(self, optim_cls: type, kwargs: Dict[str, Any], desc: str) -> None:
        import torch

        param = torch.zeros(2, requires_grad=True)
        try:
            optim_cls([param], **copy.deepcopy(kwargs))
        except ValueError as error:
            if "differentiable" not in str(error):
                raise AssertionError(f"{optim_cls.__name__}({desc!r}): refused, but the "
                                     f"error does not name differentiable: {error}") from error
        else:
            raise AssertionError(f"{optim_cls.__name__} accepted differentiable=True "
                                 f"({desc!r}); fastadam.torch must refuse it")
        key = (optim_cls.__name__, desc)
        self.seen[key] = self.seen.get(key, 0) + 1


def _patch_optim_db(optimizer: str, refusals: Refusals) -> List[str]:
    import torch
    import torch.testing._internal.common_optimizers as common_optimizers

    targets = {torch.optim.Adam: "Adam", torch.optim.AdamW: "AdamW"}
    kept = [info for info in common_optimizers.optim_db if info.optim_cls in targets]
    if sorted(info.optim_cls.__name__ for info in kept) != ["Adam", "AdamW"]:
        raise SystemExit("optim_db of this torch has no Adam/AdamW entries")
    common_optimizers.optim_db[:] = kept  # the test file's decorators read this list
    if optimizer == "fastadam":
        import fastadam.torch

        for info in kept:
            info.optim_cls = getattr(fastadam.torch, targets[info.optim_cls])

        original = common_optimizers._get_optim_inputs_including_global_cliquey_kwargs

        def without_differentiable(device, dtype, optim_info, skip=()):
            inputs = original(device, dtype, optim_info, skip=skip)
            kept_inputs = []
            for optim_input in inputs:
                if optim_input.kwargs.get("differentiable", False):
                    refusals.check(optim_info.optim_cls, optim_input.kwargs, optim_input.desc)
                else:
                    kept_inputs.append(optim_input)
            return kept_inputs

        # test_optim.py imports the helper by name: patch it before the import.
        common_optimizers._get_optim_inputs_including_global_cliquey_kwargs = (
            without_differentiable)
    return [f"{info.optim_cls.__module__}.{info.optim_cls.__qualname__}" for info in kept]


def _load_tests(path: str) -> type:
    spec = importlib.util.spec_from_file_location("torch_test_optim", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["torch_test_optim"] = module
    spec.loader.exec_module(module)
    cls = getattr(module, "TestOptimRenewedCPU", None)
    if cls is None:
        raise SystemExit(f"{path} defines no TestOptimRenewed (instantiated for the CPU)")
    return cls


class _Result(unittest.TextTestResult):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.passed: List[unittest.TestCase] = []

    def addSuccess(self, test: unittest.TestCase) -> None:
        super().addSuccess(test)
        self.passed.append(test)


def main() -> int:
    args = _arguments()
    # torch.testing's common_utils parses sys.argv when imported: give it none of ours.
    sys.argv = [sys.argv[0]]
    os.environ["PYTORCH_TESTING_DEVICE_ONLY_FOR"] = "cpu"
    os.environ.pop("PYTORCH_TEST_WITH_DYNAMO", None)
    path = os.path.abspath(args.test_file)

    refusals = Refusals()
    classes = _patch_optim_db(args.optimizer, refusals)
    _stub_sibling_modules()
    cls = _load_tests(path)

    suite = unittest.TestSuite()
    for test in unittest.TestLoader().loadTestsFromTestCase(cls):
        name = test.id().rsplit(".", 1)[-1]
        if not args.patterns or any(p in name for p in args.patterns):
            suite.addTest(test)
    if args.list:
        for test in suite:
            print(test.id().rsplit(".", 1)[-1])
        print(f"{suite.countTestCases()} tests")
        return 0

    print(f"TestOptimRenewed ({path}) on the CPU, optim_db Adam/AdamW as {', '.join(classes)}; "
          f"{suite.countTestCases()} tests", flush=True)
    start = time.monotonic()
    runner = unittest.TextTestRunner(stream=sys.stdout, verbosity=2 if args.verbose else 1,
                                     resultclass=_Result)
    result = runner.run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    print()
    if refusals.seen:
        tests = sum(refusals.seen.values())
        print(f"differentiable=True refused as expected: {len(refusals.seen)} configurations "
              f"({', '.join(f'{c} {d!r}' for c, d in sorted(refusals.seen))}), "
              f"checked {tests} times")
    print(f"optimizer: {args.optimizer}; {time.monotonic() - start:.0f} s")
    print(f"{len(result.passed)} passed, {failed} failed, {len(result.skipped)} skipped"
          + (f", {len(result.expectedFailures)} xfailed" if result.expectedFailures else ""))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
