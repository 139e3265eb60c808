"""fastadam.adam_step_rows: lazy sparse-row Adam against adam_step on each row, the
reference, thread counts, duplicate summing, and every rejection (nothing written)."""

import array
import re
from pathlib import Path

import numpy as np
import pytest

import fastadam

from conftest import VARIANTS, variant_id, variant_kwargs
from reference import adam_reference

N_ROWS, DIM = 20, 7


def table(dtype, n_rows=N_ROWS, dim=DIM, *, amsgrad=False, seed=0):
    """(param, exp_avg, exp_avg_sq, max_exp_avg_sq) of an (n_rows, dim) table, random."""
    rng = np.random.default_rng(seed)
    param = rng.standard_normal((n_rows, dim)).astype(dtype)
    exp_avg = (0.1 * rng.standard_normal((n_rows, dim))).astype(dtype)
    exp_avg_sq = (0.01 * rng.random((n_rows, dim))).astype(dtype)
    vmax = (exp_avg_sq * rng.uniform(0.5, 1.5, (n_rows, dim))).astype(dtype) if amsgrad else None
    return param, exp_avg, exp_avg_sq, vmax


def grad_rows(dtype, k, dim=DIM, seed=1):
    return np.random.default_rng(seed).standard_normal((k, dim)).astype(dtype)


def copies(buffers):
    return [None if b is None else b.copy() for b in buffers]


def assert_bitwise(got, expected):
    for name, a, b in zip(("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), got, expected):
        if a is None:
            assert b is None
            continue
        assert a.tobytes() == np.asarray(b, a.dtype).tobytes(), f"{name} differs bitwise"


def rowwise(buffers, grads, rows, **kwargs):
    """The expected result: adam_step on each distinct row alone, with the sum of its
    gradient rows (summed left to right in the element dtype)."""
    param, m, v, vmax = copies(buffers)
    for r in dict.fromkeys(int(r) for r in rows):
        summed = None
        for k in np.flatnonzero(np.asarray(rows) == r):
            summed = grads[k].copy() if summed is None else summed + grads[k]
        fastadam.adam_step(param[r], summed, m[r], v[r],
                           max_exp_avg_sq=None if vmax is None else vmax[r], **kwargs)
    return param, m, v, vmax


def lazy(buffers, grads, rows, **kwargs):
    param, m, v, vmax = copies(buffers)
    fastadam.adam_step_rows(param, grads, rows, m, v, max_exp_avg_sq=vmax, **kwargs)
    return param, m, v, vmax


ROWS = np.array([4, 0, 19, 7, 4, 12, 7, 7])  # unsorted, with duplicates, both ends


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_each_row_as_adam_step_on_that_row(dtype, variant):
    buffers = table(dtype, amsgrad=variant["amsgrad"])
    grads = grad_rows(dtype, ROWS.size)
    kwargs = dict(variant_kwargs(variant), step=3)
    assert_bitwise(lazy(buffers, grads, ROWS, **kwargs), rowwise(buffers, grads, ROWS, **kwargs))


@pytest.mark.parametrize("variant", VARIANTS[::7], ids=variant_id)
def test_matches_the_reference_on_the_rows_and_leaves_the_others(dtype, variant):
    buffers = table(dtype, amsgrad=variant["amsgrad"])
    rows = np.array([2, 9, 15])
    grads = grad_rows(dtype, rows.size)
    kwargs = dict(variant_kwargs(variant), step=5)
    got = lazy(buffers, grads, rows, **kwargs)
    untouched = np.setdiff1d(np.arange(N_ROWS), rows)
    for before, after in zip(buffers, got):
        if before is not None:
            assert after[untouched].tobytes() == before[untouched].tobytes()
    for k, r in enumerate(rows):
        expected = adam_reference(*[None if b is None else b[r] for b in buffers[:1]], grads[k],
                                  buffers[1][r], buffers[2][r],
                                  None if buffers[3] is None else buffers[3][r], dtype=dtype, **kwargs)
        assert_bitwise([None if a is None else a[r] for a in got], expected)


@pytest.mark.parametrize("n_rows, dim, k", [
    (20000, 64, 6000),   # many short rows: 384k elements, past the serial cutoff
    (12, 9001, 9),       # rows longer than a chunk: split into pieces
], ids=["short-rows", "long-rows"])
def test_results_do_not_depend_on_the_thread_count(dtype, n_rows, dim, k):
    buffers = table(dtype, n_rows, dim, amsgrad=True)
    rows = np.random.default_rng(2).integers(0, n_rows, k)  # duplicates likely
    grads = grad_rows(dtype, k, dim)
    one = lazy(buffers, grads, rows, step=2, num_threads=1)
    two = lazy(buffers, grads, rows, step=2, num_threads=2)
    assert_bitwise(two, one)
    assert_bitwise(one, rowwise(buffers, grads, rows, step=2))


def test_duplicates_are_summed_in_the_order_given():
    # float32 addition is not associative: (1e8 + 1) - 1e8 differs from (1e8 - 1e8) + 1.
    buffers = table(np.float32, 3, 1)
    rows = np.array([1, 1, 1])
    grads = np.array([[1e8], [1.0], [-1e8]], np.float32)
    got = lazy(buffers, grads, rows, step=1)
    expected = rowwise(buffers, np.array([[1e8], [1.0], [-1e8]], np.float32), rows, step=1)
    assert_bitwise(got, expected)
    reordered = lazy(buffers, grads[[0, 2, 1]], rows, step=1)
    assert reordered[0].tobytes() != got[0].tobytes()  # the order given is the order used


def test_unique_unsorted_rows_equal_sorted_rows(dtype):
    buffers = table(dtype)
    rows = np.array([9, 2, 17, 0])
    grads = grad_rows(dtype, 4)
    order = np.argsort(rows)
    assert_bitwise(lazy(buffers, grads, rows, step=1), lazy(buffers, grads[order], rows[order], step=1))


@pytest.mark.parametrize("rows", [
    [3, 1], (3, 1), np.array([3, 1], np.uint8), np.array([3, 1], np.int16),
    np.array([3, 1], np.uint64), np.array([3, 1], np.int32),
], ids=["list", "tuple", "uint8", "int16", "uint64", "int32"])
def test_any_integer_row_indices(rows):
    buffers = table(np.float32)
    grads = grad_rows(np.float32, 2)
    assert_bitwise(lazy(buffers, grads, rows, step=1), rowwise(buffers, grads, [3, 1], step=1))


@pytest.mark.parametrize("rows", [[], (), np.array([], np.int64)], ids=["list", "tuple", "array"])
def test_empty_rows_change_nothing(rows):
    buffers = table(np.float64)
    got = lazy(buffers, np.zeros((0, DIM)), rows, step=1)
    assert_bitwise(got, buffers)


def test_n_d_and_1_d_params_have_rows_along_the_first_axis(dtype):
    rng = np.random.default_rng(0)
    param = rng.standard_normal((6, 2, 3)).astype(dtype)
    m, v = np.zeros_like(param), np.zeros_like(param)
    grads = rng.standard_normal((2, 2, 3)).astype(dtype)
    expected = copies([param, m, v, None])
    for k, r in enumerate([5, 1]):
        fastadam.adam_step(expected[0][r], grads[k], expected[1][r], expected[2][r], step=1)
    fastadam.adam_step_rows(param, grads, [5, 1], m, v, step=1)
    assert_bitwise([param, m, v, None], expected)

    vector, m1, v1 = rng.standard_normal(9).astype(dtype), np.zeros(9, dtype), np.zeros(9, dtype)
    before = vector.copy()
    fastadam.adam_step_rows(vector, np.ones(2, dtype), [8, 0], m1, v1, step=1, lr=0.5)
    assert np.array_equal(vector[1:8], before[1:8]) and not np.array_equal(vector[[0, 8]], before[[0, 8]])


def test_buffer_protocol_objects_and_flat_state():
    param = np.arange(12, dtype=np.float64).reshape(4, 3)
    expected = param.copy()
    m, v = array.array("d", [0.0] * 12), bytearray(12 * 8)
    fastadam.adam_step_rows(memoryview(param), array.array("d", [1.0, 2.0, 3.0]), [2], m,
                            memoryview(v).cast("d"), step=1)
    fastadam.adam_step(expected[2], np.array([1.0, 2.0, 3.0]), np.zeros(3), np.zeros(3), step=1)
    assert param.tobytes() == expected.tobytes()
    assert np.frombuffer(m, np.float64).reshape(4, 3)[[0, 1, 3]].tobytes() == bytes(72)


def test_read_only_gradient_rows_with_duplicates(dtype):
    buffers = table(dtype)
    grads = grad_rows(dtype, ROWS.size)
    frozen = np.frombuffer(grads.tobytes(), dtype).reshape(grads.shape)  # read-only memory
    assert not frozen.flags.writeable
    assert_bitwise(lazy(buffers, frozen, ROWS, step=1), rowwise(buffers, grads, ROWS, step=1))


def test_unaligned_param_is_updated_through_an_aligned_copy():
    raw = bytearray(4 * 6 * 2 + 1)
    param = np.frombuffer(raw, np.float32, count=12, offset=1).reshape(6, 2)
    assert not param.flags.aligned
    param[...] = np.arange(12, dtype=np.float32).reshape(6, 2)
    expected = param.copy()
    m, v = np.zeros((6, 2), np.float32), np.zeros((6, 2), np.float32)
    fastadam.adam_step_rows(param, np.ones((1, 2), np.float32), [4], m, v, step=1)
    fastadam.adam_step(expected[4], np.ones(2, np.float32), np.zeros(2, np.float32),
                       np.zeros(2, np.float32), step=1)
    assert param.tobytes() == expected.tobytes()


# --- rejections: each names the argument, and no byte of any buffer changes -------------------

def rejection_cases():
    f32 = np.float32
    yield "negative", dict(rows=[1, -1]), ValueError, r"rows must be in \[0, 20\).*got -1 at position 1"
    yield "out-of-range", dict(rows=[1, 20]), ValueError, r"rows must be in \[0, 20\).*got 20 at position 1"
    yield "huge-uint64", dict(rows=np.array([1, 2**63 + 5], np.uint64)), ValueError, r"rows must be in"
    yield "float-rows", dict(rows=[1.0, 2.0]), TypeError, r"rows must hold integer row indices, got dtype float64"
    yield "bool-rows", dict(rows=[True, False]), TypeError, r"rows must hold integer row indices, got dtype bool"
    yield "2-d-rows", dict(rows=[[1, 2]], grad_rows=np.ones((2, DIM), f32)), ValueError, r"rows must be 1-D"
    yield "ragged-rows", dict(rows=[[1], [2, 3]]), TypeError, r"rows must be a 1-D sequence"
    yield "too-few-rows", dict(rows=[1]), ValueError, r"grad_rows must have shape \(1, 7\)"
    yield "grad-row-size", dict(grad_rows=np.ones((2, DIM + 1), f32)), ValueError, r"grad_rows must have shape \(2, 7\)"
    yield "grad-dtype", dict(grad_rows=np.ones((2, DIM))), TypeError, r"grad_rows must have the param's dtype float32"
    yield "state-dtype", dict(exp_avg=np.zeros((N_ROWS, DIM))), TypeError, r"exp_avg must have param's dtype"
    yield "state-size", dict(exp_avg_sq=np.zeros((N_ROWS - 1, DIM), f32)), ValueError, r"exp_avg_sq must have 140 elements"
    yield "vmax-size", dict(max_exp_avg_sq=np.zeros(3, f32)), ValueError, r"max_exp_avg_sq must have 140 elements"
    yield "step", dict(step=0), ValueError, r"step must be an integer in"
    yield "lr", dict(lr=-1.0), ValueError, r"lr must be >= 0.0"
    yield "grad_scale", dict(grad_scale=0.0), ValueError, r"grad_scale must be > 0.0"
    yield "num_threads", dict(num_threads=0), ValueError, r"num_threads must be None or a positive"


@pytest.mark.parametrize("case", list(rejection_cases()), ids=lambda c: c[0])
def test_rejections_name_the_argument_and_write_nothing(case):
    _, overrides, exc, match = case
    param, m, v, _ = table(np.float32)
    args = dict(param=param, grad_rows=grad_rows(np.float32, 2), rows=[3, 5], exp_avg=m, exp_avg_sq=v,
                step=1)
    args.update(overrides)
    arrays = [a for a in args.values() if isinstance(a, np.ndarray)]
    before = [a.tobytes() for a in arrays]
    with pytest.raises(exc, match=match):
        fastadam.adam_step_rows(**args)
    assert [a.tobytes() for a in arrays] == before


def test_overlapping_and_read_only_buffers_are_refused():
    param, m, v, _ = table(np.float32)
    before = [a.tobytes() for a in (param, m, v)]
    with pytest.raises(ValueError, match="grad_rows overlaps param in memory"):
        fastadam.adam_step_rows(param, param[3:5], [0, 1], m, v, step=1)
    with pytest.raises(ValueError, match="exp_avg_sq overlaps exp_avg in memory"):
        fastadam.adam_step_rows(param, np.ones((1, DIM), np.float32), [0], m, m, step=1)
    frozen = param.copy()
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="param is updated in place and must be writable"):
        fastadam.adam_step_rows(frozen, np.ones((1, DIM), np.float32), [0], m, v, step=1)
    with pytest.raises(ValueError, match="grad_rows is row-sparse, which needs a param with rows"):
        fastadam.adam_step_rows(np.zeros((), np.float32), np.ones(1, np.float32), [0],
                                np.zeros(1, np.float32), np.zeros(1, np.float32), step=1)
    assert [a.tobytes() for a in (param, m, v)] == before


def test_exported():
    assert "adam_step_rows" in fastadam.__all__


# --- the optimizer objects: (rows, values) gradients ---------------------------------------------

def model_params(dtype, seed=0):
    """An embedding table between two dense tensors."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in [(5, 3), (N_ROWS, DIM), (11,)]]


def batch(dtype, t, k=6):
    """Dense grads for params 0 and 2, a row-sparse one (with duplicates) for param 1."""
    rng = np.random.default_rng(100 + t)
    rows = rng.integers(0, N_ROWS, k)
    return [rng.standard_normal((5, 3)).astype(dtype), (rows, rng.standard_normal((k, DIM)).astype(dtype)),
            rng.standard_normal(11).astype(dtype)]


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("cls, hp", [
    (fastadam.Adam, {}),
    (fastadam.Adam, {"amsgrad": True, "weight_decay": 0.1, "maximize": True}),
    (fastadam.AdamW, {"eps_hat": True, "lr": 0.01}),
], ids=["Adam", "Adam-amsgrad-l2-maximize", "AdamW-eps_hat"])
def test_optimizer_step_equals_adam_step_and_adam_step_rows(dtype, cls, hp, num_threads):
    params = model_params(dtype)
    opt = cls(params, num_threads=num_threads, **hp)
    ref = [p.copy() for p in params]
    amsgrad = hp.get("amsgrad", False)
    state = [fastadam.adam_state(p, amsgrad=amsgrad) for p in ref]
    kwargs = {k: v for k, v in hp.items() if k != "amsgrad"}
    if cls is fastadam.AdamW:
        kwargs.update(weight_decay=1e-2, decoupled_weight_decay=True)
    for t in range(1, 5):
        grads = batch(dtype, t)
        assert opt.step(grads, grad_scale=2.0) is True
        for p, g, s in zip(ref, grads, state):
            extra = dict(step=t, max_exp_avg_sq=s.get("max_exp_avg_sq"), grad_scale=2.0, **kwargs)
            if isinstance(g, tuple):
                fastadam.adam_step_rows(p, g[1], g[0], s["exp_avg"], s["exp_avg_sq"], **extra)
            else:
                fastadam.adam_step(p, g, s["exp_avg"], s["exp_avg_sq"], **extra)
    for p, r, s, got in zip(params, ref, state, opt.state):
        assert p.tobytes() == r.tobytes()
        for key, values in s.items():
            assert got[key].tobytes() == values.tobytes(), key
    assert [s["step"] for s in opt.state] == [4, 4, 4]


def test_a_row_sparse_param_inside_a_run_of_back_to_back_params():
    flat = fastadam.FlatParams.from_arrays(model_params(np.float32))
    opt = fastadam.Adam(flat.params)
    assert opt.engine.table.runs() == [(0, 3)]  # one run: merged when all grads are dense
    before = [p.copy() for p in flat.params]
    rows = np.array([2, 5])
    grads = [np.ones((5, 3), np.float32), (rows, np.ones((2, DIM), np.float32)), np.ones(11, np.float32)]
    opt.step(grads)
    untouched = np.setdiff1d(np.arange(N_ROWS), rows)
    assert flat.params[1][untouched].tobytes() == before[1][untouched].tobytes()
    assert np.all(flat.params[1][rows] != before[1][rows])
    assert np.all(flat.params[0] != before[0]) and np.all(flat.params[2] != before[2])
    m = opt.state[1]["exp_avg"]
    assert not m[untouched].any() and m[rows].all()


def test_empty_rows_still_advance_the_tensors_step():
    params = model_params(np.float64)
    opt = fastadam.Adam(params)
    before = params[1].tobytes()
    opt.step([np.ones((5, 3)), ([], np.zeros((0, DIM))), np.ones(11)])
    assert params[1].tobytes() == before
    assert [s["step"] for s in opt.state] == [1, 1, 1]


def test_a_bad_row_sparse_gradient_rejects_the_whole_step():
    params = model_params(np.float32)
    opt = fastadam.Adam(params)
    opt.step(batch(np.float32, 0))
    snapshot = ([p.tobytes() for p in params],
                [{k: (v.tobytes() if isinstance(v, np.ndarray) else v) for k, v in s.items()} for s in opt.state])
    good = batch(np.float32, 1)
    bad_cases = [
        ((np.array([0, N_ROWS]), good[1][1][:2]), ValueError, r"grads\[1\]\[0\] \(rows\) must be in \[0, 20\)"),
        ((np.array([-1]), good[1][1][:1]), ValueError, r"grads\[1\]\[0\] \(rows\) must be in"),
        ((np.array([1.0]), good[1][1][:1]), TypeError, r"grads\[1\]\[0\] \(rows\) must hold integer"),
        ((np.array([1]), good[1][1][:1].astype(np.float64)), TypeError, r"grads\[1\]\[1\] \(values\) must have the param's dtype"),
        ((np.array([1, 2]), good[1][1][:1]), ValueError, r"grads\[1\]\[1\] \(values\) must have shape \(2, 7\)"),
        ((np.array([1]), params[1][3:4]), ValueError, r"grads\[1\]\[1\] \(values\) overlaps a parameter"),
        ((np.array([1]), good[1][1][:1], 3), TypeError, r"grads\[1\] is a tuple, so it must be a row-sparse"),
    ]
    for sparse, exc, match in bad_cases:
        with pytest.raises(exc, match=match):
            opt.step([good[0], sparse, good[2]])
    with pytest.raises(ValueError, match=r"grads\[0\] is row-sparse, which needs a param with rows"):
        fastadam.Adam([np.zeros((), np.float32)]).step([(np.array([0]), np.ones(1, np.float32))])
    assert snapshot == ([p.tobytes() for p in params],
                        [{k: (v.tobytes() if isinstance(v, np.ndarray) else v) for k, v in s.items()} for s in opt.state])


def test_masked_row_indices_are_checked_as_the_memory_the_kernel_reads():
    # A masked array's argmin/argmax skip masked entries: an out-of-range index under the
    # mask passed the range check, and the kernel wrote row 10**9 (a segfault).
    rows = np.ma.array([1, 3], mask=[False, True])
    rows.data[1] = 10**9
    param, m, v, _ = table(np.float32)
    weights = param.copy()
    opt = fastadam.Adam([weights])
    before = [a.tobytes() for a in (param, m, v, weights)]
    with pytest.raises(ValueError, match=r"rows must be in \[0, 20\).*got 1000000000 at position 1"):
        fastadam.adam_step_rows(param, grad_rows(np.float32, 2), rows, m, v, step=1)
    with pytest.raises(ValueError, match=r"grads\[0\]\[0\] \(rows\) must be in \[0, 20\)"):
        opt.step([(rows, grad_rows(np.float32, 2))])
    assert [a.tobytes() for a in (param, m, v, weights)] == before and opt.state[0]["step"] == 0
    # in range, a masked array's memory is what counts (as for every buffer argument)
    rows.data[1] = 4
    expected = lazy((param, m, v, None), grad_rows(np.float32, 2), [1, 4], step=1)
    assert_bitwise(lazy((param, m, v, None), grad_rows(np.float32, 2), rows, step=1), expected)


def test_skip_if_nonfinite_sees_row_sparse_values():
    params = model_params(np.float32)
    opt = fastadam.Adam(params)
    grads = batch(np.float32, 0)
    grads[1][1][3, 4] = np.nan
    before = [p.tobytes() for p in params]
    assert opt.step(grads, skip_if_nonfinite=True) is False
    assert [p.tobytes() for p in params] == before and opt.skipped_steps == 1
    assert [s["step"] for s in opt.state] == [0, 0, 0]
    grads[1][1][3, 4] = 0.0
    assert opt.step(grads, skip_if_nonfinite=True) is True


def test_duplicate_summing_with_row_indices_too_large_for_the_sort_key():
    from fastadam._rows import sum_duplicate_rows
    rows = np.array([2**61, 5, 2**61, 5, 7], np.int64)
    values = np.arange(10, dtype=np.float64)
    unique, summed = sum_duplicate_rows(rows, values, 2)
    assert unique.tolist() == [5, 7, 2**61]
    assert summed.tolist() == [2 + 6, 3 + 7, 8, 9, 0 + 4, 1 + 5]


def test_rows_of_no_elements():
    param = np.zeros((5, 0), np.float32)
    opt = fastadam.Adam([param])
    opt.step([(np.array([1, 1, 3]), np.zeros((3, 0), np.float32))])
    assert opt.state[0]["step"] == 1
    fastadam.adam_step_rows(param, np.zeros((2, 0), np.float32), [4, 4], np.zeros(0, np.float32),
                            np.zeros(0, np.float32), step=1)


def test_docs_embedding_example_learns_the_rows_it_sees_and_no_other(capsys):
    guide = Path(__file__).resolve().parents[1] / "docs" / "guide" / "embeddings.md"
    if not guide.exists():
        pytest.skip("not a source checkout")
    blocks = re.findall(r"```python\n(.*?)```", guide.read_text(), flags=re.S)
    namespace = {}
    exec(compile(next(b for b in blocks if "adam_step_rows" in b), "the embedding guide's example",
                 "exec"), namespace)
    assert float(capsys.readouterr().out) < 0.1
    initial = np.random.default_rng(0).standard_normal((100_000, 16), dtype=np.float32)
    assert namespace["table"][1_000:].tobytes() == initial[1_000:].tobytes()
    assert not namespace["state"]["exp_avg"][1_000:].any()


def test_row_sparse_param_takes_its_own_groups_hyperparameters_and_schedule():
    params = model_params(np.float64)
    opt = fastadam.Adam([{"params": [params[0], params[2]]},
                         {"params": [params[1]], "lr": lambda t: 0.1 / t, "amsgrad": True,
                          "betas": (0.5, 0.9)}])
    table_copy = params[1].copy()
    state = fastadam.adam_state(table_copy, amsgrad=True)
    for t in range(1, 4):
        dense_a, (rows, values), dense_b = batch(np.float64, t)
        opt.step([dense_a, dense_b, (rows, values)])
        fastadam.adam_step_rows(table_copy, values, rows, state["exp_avg"], state["exp_avg_sq"],
                                max_exp_avg_sq=state["max_exp_avg_sq"], step=t, lr=0.1 / t,
                                beta1=0.5, beta2=0.9)
    assert params[1].tobytes() == table_copy.tobytes()
    for key, values in state.items():
        assert opt.state[2][key].tobytes() == values.tobytes(), key


def test_team_size_follows_the_elements_a_step_updates(monkeypatch):
    # A step's team size is chosen from what it updates: one row of a large table is
    # small work (one thread), the whole table is not.
    import fastadam._engine

    seen = []
    real = fastadam._engine.threads_for
    monkeypatch.setattr(fastadam._engine, "threads_for", lambda n, size: seen.append(size) or real(n, size))
    table, bias = np.zeros((4096, 32), np.float32), np.zeros(10, np.float32)
    opt = fastadam.Adam([table, bias])
    opt.step([np.ones_like(table), np.ones_like(bias)])
    opt.step([([7, 7, 9], np.ones((3, 32), np.float32)), np.ones_like(bias)])
    assert seen == [table.size + bias.size, 2 * 32 + bias.size]
