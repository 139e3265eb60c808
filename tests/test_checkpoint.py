"""fastadam.save / fastadam.load: no pickle, atomic, exact resume, clear errors."""

import os
import zipfile

import numpy as np
import pytest

import fastadam
from fastadam import schedules


def make_setup(seed=0, amsgrad=True):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(d) for s, d in (((30,), np.float32), ((4, 5), np.float64))]
    opt = fastadam.Adam([{"params": params[:1], "lr": schedules.inverse_sqrt(0.1)},
                         {"params": params[1:], "amsgrad": amsgrad, "lr": 0.01}])
    return params, opt


def grads_for(params, t):
    rng = np.random.default_rng(100 + t)
    return [rng.standard_normal(p.shape).astype(p.dtype) for p in params]


def test_save_load_continue_is_bit_identical(tmp_path):
    params, opt = make_setup()
    for t in range(3):
        opt.step(grads_for(params, t))
    path = tmp_path / "opt.npz"
    fastadam.save(opt, path)
    resumed_params = [p.copy() for p in params]
    _, resumed = make_setup(amsgrad=False)
    resumed = fastadam.Adam([{"params": resumed_params[:1], "lr": schedules.inverse_sqrt(0.1)},
                             {"params": resumed_params[1:], "lr": 0.5}])
    fastadam.load(resumed, path)
    assert resumed.param_groups[1]["amsgrad"] is True and resumed.param_groups[1]["lr"] == 0.01
    assert resumed.param_groups[0]["lr"] == schedules.inverse_sqrt(0.1)
    for t in range(3, 7):
        opt.step(grads_for(params, t))
        resumed.step(grads_for(resumed_params, t))
    for a, b in zip(params, resumed_params):
        np.testing.assert_array_equal(a, b)


def test_checkpoint_loads_without_pickle(tmp_path):
    params, opt = make_setup()
    opt.step(grads_for(params, 0))
    fastadam.save(opt, tmp_path / "c.npz")
    with np.load(tmp_path / "c.npz", allow_pickle=False) as f:
        assert "state/1/max_exp_avg_sq" in f.files
        assert all(f[name].dtype != object for name in f.files)


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    params, opt = make_setup()
    path = tmp_path / "opt.npz"
    fastadam.save(opt, path)
    before = path.read_bytes()
    opt.step(grads_for(params, 0))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        fastadam.save(opt, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["opt.npz"]  # no temporary file left


def test_truncated_corrupt_and_foreign_files_are_value_errors(tmp_path):
    params, opt = make_setup()
    opt.step(grads_for(params, 0))
    good = tmp_path / "good.npz"
    fastadam.save(opt, good)
    data = good.read_bytes()
    cases = {
        "truncated.npz": data[: len(data) // 2],
        "garbage.npz": os.urandom(1000),
        "empty.npz": b"",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    np.savez(tmp_path / "foreign.npz", weights=np.zeros(3))
    with zipfile.ZipFile(tmp_path / "flipped.npz", "w") as z:  # valid zip, wrong contents
        z.writestr("__fastadam__.npy", b"not an npy file")
    state_before = [s["exp_avg"].tobytes() for s in opt.state]
    for name in list(cases) + ["foreign.npz", "flipped.npz"]:
        with pytest.raises(ValueError, match="fastadam"):
            fastadam.load(opt, tmp_path / name)
    assert [s["exp_avg"].tobytes() for s in opt.state] == state_before
    with pytest.raises(FileNotFoundError):
        fastadam.load(opt, tmp_path / "missing.npz")


def rewrite_members(source, target, change, compression=zipfile.ZIP_STORED):
    """Copy the zip ``source`` to ``target``, member by member through
    ``change(name, data) -> data`` (then None drops the member)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", compression) as new:
        for info in old.infolist():
            data = change(info.filename, old.read(info))
            if data is not None:
                new.writestr(info.filename, data)


def npy_header(shape, descr="<f4"):
    import io
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False,
                                                  "shape": shape})
    return buffer.getvalue()


def test_damaged_zip_members_are_value_errors(tmp_path):
    # Found by tests/test_fuzz.py: zlib.error, NotImplementedError and RuntimeError used
    # to escape from load() for a damaged compressed member, an unknown compression
    # method and a member flagged as encrypted.
    params, opt = make_setup()
    opt.step(grads_for(params, 0))
    good = tmp_path / "good.npz"
    fastadam.save(opt, good)
    deflated = tmp_path / "deflated.npz"
    rewrite_members(good, deflated, lambda name, data: data, zipfile.ZIP_DEFLATED)
    fastadam.load(opt, deflated)  # compressed checkpoints are fine
    data = bytearray(deflated.read_bytes())
    with zipfile.ZipFile(deflated) as z:
        info = z.infolist()[0]
    damaged = bytearray(data)
    start = info.header_offset + 30 + len(info.filename)  # the member's compressed bytes
    damaged[start:start + 8] = b"\xff" * 8
    central = data.index(b"PK\x01\x02")  # the first member's central directory entry,
    method = bytearray(data)               # which zipfile reads its method and flags from
    method[central + 10] = 99  # compression method 99: not one zipfile reads
    encrypted = bytearray(data)
    encrypted[central + 8] |= 1  # general purpose flag bit 0: encrypted
    state_before = [s["exp_avg"].tobytes() for s in opt.state]
    for name, content in {"damaged": damaged, "method": method, "encrypted": encrypted}.items():
        path = tmp_path / f"{name}.npz"
        path.write_bytes(content)
        with pytest.raises(ValueError, match="not a readable fastadam checkpoint"):
            fastadam.load(opt, path)
    assert [s["exp_avg"].tobytes() for s in opt.state] == state_before


def test_a_huge_declared_array_is_a_value_error_not_an_allocation(tmp_path):
    # A corrupt .npy header declaring 4 TiB: NumPy would try to allocate it (MemoryError).
    params, opt = make_setup()
    good = tmp_path / "good.npz"
    fastadam.save(opt, good)
    huge = tmp_path / "huge.npz"
    rewrite_members(good, huge, lambda name, data: npy_header((2**40,)) + data[-64:]
                    if name.endswith("exp_avg.npy") else data)
    with pytest.raises(ValueError, match="declares 4398046511104 bytes of data"):
        fastadam.load(opt, huge)


def test_checkpoint_of_another_model_is_rejected(tmp_path):
    params, opt = make_setup()
    fastadam.save(opt, tmp_path / "a.npz")
    other = fastadam.Adam([np.zeros(7, np.float32)])
    with pytest.raises(ValueError, match="param groups"):
        fastadam.load(other, tmp_path / "a.npz")


def test_save_and_load_check_their_arguments(tmp_path):
    with pytest.raises(TypeError, match="^opt must be a fastadam.Adam"):
        fastadam.save(object(), tmp_path / "x.npz")
    with pytest.raises(TypeError, match="^opt must be a fastadam.Adam"):
        fastadam.load({}, tmp_path / "x.npz")


def test_npy_file_is_a_value_error(tmp_path):
    params, opt = make_setup()
    np.save(tmp_path / "x.npy", np.zeros(3))
    with pytest.raises(ValueError, match="not a readable fastadam checkpoint"):
        fastadam.load(opt, tmp_path / "x.npy")


def test_betas_given_as_a_list_save_fine(tmp_path):
    params = [np.zeros(3, np.float32)]
    opt = fastadam.Adam(params, betas=[0.8, 0.99])
    opt.param_groups[0]["betas"] = [0.7, 0.9]
    fastadam.save(opt, tmp_path / "b.npz")
    fastadam.load(opt, tmp_path / "b.npz")
    assert opt.param_groups[0]["betas"] == (0.7, 0.9)


def test_checkpoint_file_mode_follows_the_umask(tmp_path):
    params, opt = make_setup()
    old = os.umask(0o022)
    try:
        fastadam.save(opt, tmp_path / "m.npz")
    finally:
        os.umask(old)
    assert (tmp_path / "m.npz").stat().st_mode & 0o777 == 0o644
