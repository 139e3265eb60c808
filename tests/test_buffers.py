"""adam_step on every kind of buffer: results bit-identical to the same update on ndarrays."""

import array
import ctypes
import mmap

import numpy as np
import pytest

import fastadam

from conftest import make_grads, make_state

N = 1003
KWARGS = dict(step=3, lr=0.01, weight_decay=0.01, decoupled_weight_decay=True)


def expected_update(dtype):
    param, m, v, vmax = make_state(N, dtype, amsgrad=True)
    grad = make_grads(N, dtype, 1)[0]
    fastadam.adam_step(param, grad, m, v, max_exp_avg_sq=vmax, **KWARGS)
    return param, m, v, vmax


def run_with(kind, dtype):
    """Wrap fresh state in buffers made by ``kind``; return their contents after a step."""
    param, m, v, vmax = make_state(N, dtype, amsgrad=True)
    grad = make_grads(N, dtype, 1)[0]
    wrapped = [kind(a) for a in (param, grad, m, v, vmax)]
    fastadam.adam_step(wrapped[0], wrapped[1], wrapped[2], wrapped[3],
                       max_exp_avg_sq=wrapped[4], **KWARGS)
    return [np.frombuffer(memoryview(w).cast("B"), dtype=dtype).copy()
            for i, w in enumerate(wrapped) if i != 1]


def as_memoryview(a):
    return memoryview(a)


def as_array_array(a):
    return array.array("f" if a.dtype == np.float32 else "d", a.tobytes())


def as_bytearray_memoryview(a):
    return memoryview(bytearray(a.tobytes())).cast("f" if a.dtype == np.float32 else "d")


def as_bytearray_ndarray(a):
    return np.frombuffer(bytearray(a.tobytes()), dtype=a.dtype)


def as_mmap_view(a):
    block = mmap.mmap(-1, a.nbytes)
    block[:] = a.tobytes()
    return memoryview(block).cast("f" if a.dtype == np.float32 else "d")


def as_ctypes_array(a):
    ctype = ctypes.c_float if a.dtype == np.float32 else ctypes.c_double
    return (ctype * a.size).from_buffer_copy(a.tobytes())


def as_unaligned(a):
    """An ndarray whose data starts one byte past an aligned address."""
    raw = bytearray(a.nbytes + 1)
    view = np.frombuffer(raw, dtype=a.dtype, offset=1, count=a.size)
    view[...] = a
    assert not view.flags.aligned
    return view


def as_2d(a):
    return a.copy().reshape(1, -1)


KINDS = [as_memoryview, as_array_array, as_bytearray_memoryview, as_bytearray_ndarray,
         as_mmap_view, as_ctypes_array, as_unaligned, as_2d]


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__[3:])
def test_buffer_kinds_update_in_place_like_ndarrays(dtype, kind):
    expected = expected_update(dtype)
    got = run_with(kind, dtype)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g.view(np.uint8), e.view(np.uint8))


def test_unaligned_buffers_mixed_with_aligned_ones(dtype):
    param, m, v, vmax = make_state(N, dtype, amsgrad=True)
    grad = make_grads(N, dtype, 1)[0]
    expected = expected_update(dtype)
    p_u, g_u = as_unaligned(param), as_unaligned(grad)
    fastadam.adam_step(p_u, g_u, m, v, max_exp_avg_sq=vmax, **KWARGS)
    for g, e in zip((p_u, m, v, vmax), expected):
        np.testing.assert_array_equal(g, e)


def test_file_backed_memmap(tmp_path, dtype):
    expected = expected_update(dtype)
    param, m, v, vmax = make_state(N, dtype, amsgrad=True)
    grad = make_grads(N, dtype, 1)[0]
    mapped = []
    for name, a in (("p", param), ("m", m), ("v", v), ("vmax", vmax)):
        mm = np.memmap(tmp_path / name, dtype=dtype, mode="w+", shape=a.shape)
        mm[...] = a
        mapped.append(mm)
    fastadam.adam_step(mapped[0], grad, mapped[1], mapped[2], max_exp_avg_sq=mapped[3], **KWARGS)
    for mm in mapped:
        mm.flush()
    for name, e in zip(("p", "m", "v", "vmax"), expected):
        np.testing.assert_array_equal(np.fromfile(tmp_path / name, dtype=dtype), e)


def test_read_only_bytes_grad(dtype):
    expected = expected_update(dtype)
    param, m, v, vmax = make_state(N, dtype, amsgrad=True)
    grad = bytes(make_grads(N, dtype, 1)[0].tobytes())
    grad_view = memoryview(grad).cast("f" if dtype == np.float32 else "d")
    fastadam.adam_step(param, grad_view, m, v, max_exp_avg_sq=vmax, **KWARGS)
    np.testing.assert_array_equal(param, expected[0])


def test_bytes_param_is_rejected_as_read_only():
    data = memoryview(bytes(16)).cast("f")
    with pytest.raises(ValueError, match="^param is updated in place and must be writable"):
        fastadam.adam_step(data, np.zeros(4, np.float32), np.zeros(4, np.float32),
                           np.zeros(4, np.float32), step=1)


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.int8, np.int64, np.complex64])
def test_other_memoryview_formats_are_type_errors(dtype):
    data = memoryview(np.zeros(4, dtype))  # formats 'e', 'i', 'b', 'l', 'Zf'
    with pytest.raises(TypeError, match="^exp_avg must have dtype float32, float64, bfloat16 or float16"):
        fastadam.adam_step(np.zeros(4, np.float32), np.zeros(4, np.float32), data,
                           np.zeros(4, np.float32), step=1)


def test_big_endian_ctypes_buffer_is_a_type_error():
    data = (ctypes.c_float.__ctype_be__ * 4)()
    with pytest.raises(TypeError, match="^grad must have dtype float32, float64, bfloat16 or float16, got float32 in non-native"):
        fastadam.adam_step(np.zeros(4, np.float32), data, np.zeros(4, np.float32),
                           np.zeros(4, np.float32), step=1)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_state_is_zeroed_shaped_and_staggered(dtype, amsgrad):
    param = np.ones((30, 7), dtype)
    state = fastadam.adam_state(param, amsgrad=amsgrad)
    assert set(state) == {"exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad else set())
    offsets = {a.ctypes.data % 4096 for a in state.values()}
    assert len(offsets) == len(state)  # all at different page offsets
    for a in state.values():
        assert a.shape == param.shape and a.dtype == dtype and not a.any()
    fastadam.adam_step(param, np.ones_like(param), state["exp_avg"], state["exp_avg_sq"], step=1,
                       max_exp_avg_sq=state.get("max_exp_avg_sq"))
    assert state["exp_avg"].any()


def test_adam_state_rejects_bad_params():
    with pytest.raises(TypeError, match="^param must have dtype float32, float64, bfloat16 or float16"):
        fastadam.adam_state(np.zeros(3, np.int8))
    with pytest.raises(TypeError, match="^amsgrad must be a bool"):
        fastadam.adam_state(np.zeros(3), amsgrad="yes")
