"""FlatParams, and the optimizer updating back-to-back tensors as one stream."""

import numpy as np
import pytest

import fastadam
from fastadam._memory import PAGE, zeros_at

SHAPES = [(3, 4), 7, (2, 2, 2), (1000,), ()]


def filled(flat, seed=0):
    rng = np.random.default_rng(seed)
    flat.data[...] = rng.standard_normal(flat.data.size)
    return flat


def fill_grads(flat, seed):
    rng = np.random.default_rng(seed)
    for g in flat.grads:
        g[...] = rng.standard_normal(g.shape)


def test_layout(dtype):
    flat = fastadam.FlatParams(SHAPES, dtype)
    assert [p.shape for p in flat.params] == [(3, 4), (7,), (2, 2, 2), (1000,), ()]
    assert flat.data.size == 12 + 7 + 8 + 1000 + 1 and flat.data.dtype == dtype
    assert flat.data.ctypes.data % 64 == 0 and flat.grad_data.ctypes.data % 64 == 0
    offset = 0
    for p, g in zip(flat.params, flat.grads):
        assert p.ctypes.data == flat.data.ctypes.data + offset
        assert g.ctypes.data == flat.grad_data.ctypes.data + offset
        assert np.shares_memory(p, flat.data) and not p.any() and not g.any()
        offset += p.nbytes
    assert len(flat) == 5 and list(flat)[0] is flat.params[0]
    assert repr(flat) == f"FlatParams(5 tensors, 1028 elements, {np.dtype(dtype).name})"


def test_zero_grad_and_from_arrays():
    arrays = [np.arange(6.0).reshape(2, 3), np.ones(4)]
    flat = fastadam.FlatParams.from_arrays(arrays)
    assert flat.dtype == np.float64
    np.testing.assert_array_equal(flat.params[0], arrays[0])
    flat.grads[1][...] = 5
    flat.zero_grad()
    assert not flat.grad_data.any()
    assert fastadam.FlatParams.from_arrays(arrays, np.float32).dtype == np.float32


@pytest.mark.parametrize("shapes, dtype, exc, match", [
    ([(2, -1)], np.float32, ValueError, r"shapes\[0\] must have non-negative dimensions"),
    ([(2, 1.5)], np.float32, TypeError, r"shapes\[0\] must be an int or a sequence of ints"),
    ([object()], np.float32, TypeError, r"shapes\[0\] must be an int or a sequence of ints"),
    ([3], np.int32, TypeError, r"dtype must be one of float32, float64, bfloat16 or float16, got int32"),
    ([3], "nonsense", TypeError, r"dtype must name an element type"),
    (np.zeros(3), np.float32, TypeError, r"shapes must be a sequence of shapes"),
])
def test_bad_arguments(shapes, dtype, exc, match):
    with pytest.raises(exc, match=match):
        fastadam.FlatParams(shapes, dtype)


def test_zeros_at_places_data_at_the_page_offset():
    for offset in (0, 64, 1024, 4032):
        a = zeros_at(100, np.float32, offset)
        assert a.ctypes.data % PAGE == offset and a.size == 100 and not a.any()
    with pytest.raises(ValueError, match="page_offset must be a multiple of 64"):
        zeros_at(10, np.float32, 100)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_flat_model_steps_as_one_stream_with_identical_results(dtype, amsgrad):
    flat = filled(fastadam.FlatParams(SHAPES, dtype))
    separate = [p.copy() for p in flat.params]
    opt_flat = fastadam.Adam(flat.params, amsgrad=amsgrad, weight_decay=0.01)
    opt_separate = fastadam.Adam(separate, amsgrad=amsgrad, weight_decay=0.01)
    for t in range(3):
        fill_grads(flat, t)
        opt_flat.step(flat.grads)
        opt_separate.step([g.copy() for g in flat.grads])
    assert opt_flat.engine.table.runs() == [(0, 5)]
    assert opt_flat.engine.table.records_in_last_pass == 1
    for a, b in zip(flat.params, separate):
        np.testing.assert_array_equal(a, b)


def test_scattered_grads_fall_back_to_tensor_by_tensor():
    flat = filled(fastadam.FlatParams(SHAPES))
    opt = fastadam.Adam(flat.params)
    fill_grads(flat, 0)
    opt.step([g.copy() for g in flat.grads])
    assert opt.engine.table.records_in_last_pass == 5


def test_groups_split_runs_and_uneven_steps_split_merges():
    flat = filled(fastadam.FlatParams(SHAPES))
    opt = fastadam.Adam([{"params": flat.params[:2]}, {"params": flat.params[2:], "lr": 0.1}])
    fill_grads(flat, 0)
    opt.step(flat.grads)
    assert opt.engine.table.runs() == [(0, 2), (2, 5)] and opt.engine.table.records_in_last_pass == 2
    sd = opt.state_dict()
    sd["state"][3]["step"] = 7
    opt.load_state_dict(sd)
    reference = [p.copy() for p in flat.params]
    steps = [s["step"] for s in opt.state]
    opt.step(flat.grads)
    assert opt.engine.table.records_in_last_pass == 4  # run (2, 5) split: steps 1, 7, 1
    for p, r, g, s, state in zip(flat.params, reference, flat.grads, steps, sd["state"].values()):
        lr = 0.1 if p.size in (8, 1000, 1) else 1e-3
        expected_m, expected_v = state["exp_avg"].copy(), state["exp_avg_sq"].copy()
        fastadam.adam_step(r, g, expected_m, expected_v, step=s + 1, lr=lr)
        np.testing.assert_array_equal(p, r)


def test_16_bit_blocks_for_master_weights():
    from fastadam._validation import type_name

    flat = fastadam.FlatParams([(2, 3), 4], "bfloat16")
    assert type_name(flat.dtype) == "bfloat16" and flat.data.itemsize == 2
    assert flat.data.ctypes.data % 64 == 0 and flat.params[1].shape == (4,)
    half = fastadam.FlatParams.from_arrays([np.full(3, 1.5, np.float16)])
    assert half.dtype == np.float16 and half.data.tolist() == [1.5] * 3
