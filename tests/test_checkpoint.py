"""fastadam.save / fastadam.load: no pickle, atomic, exact resume, clear errors."""

import os
import signal
import subprocess
import sys
import time
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


# --- reliability: killed writers, bit flips, pickled payloads ----------------------------

KILLED_WRITER = """
import os, sys
import numpy as np
import fastadam

path, size = sys.argv[1], int(sys.argv[2])
param = np.zeros(size, np.float32)
opt = fastadam.Adam([param], lr=0.01)
if os.path.exists(path):  # a restarted job resumes from its checkpoint
    fastadam.load(opt, path)
grad = np.full(size, 0.5, np.float32)
print("ready", flush=True)
while True:  # every save holds a new step count and the state that goes with it
    opt.step([grad])
    fastadam.save(opt, path)
    print("saved", flush=True)
"""


def expected_state(steps):
    """exp_avg and exp_avg_sq after ``steps`` steps of the killed writer (per element)."""
    param = np.zeros(1, np.float32)
    opt = fastadam.Adam([param], lr=0.01)
    for _ in range(steps):
        opt.step([np.full(1, 0.5, np.float32)])
    return opt.state[0]["exp_avg"][0], opt.state[0]["exp_avg_sq"][0]


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_writer_killed_at_random_moments_leaves_a_complete_checkpoint(tmp_path):
    # A child saves a 2 MiB-per-buffer optimizer to one path in a loop; the parent kills
    # it (SIGKILL: no cleanup runs) at random moments, mostly mid-write, and then loads the
    # path: always ONE complete checkpoint, whose arrays are exactly the state of the step
    # count its header names (a mix of two saves could not be), and never an older one
    # than the last load found (each writer resumes from it). Leftover temporary files
    # neither break a load nor a later save.
    size, rng, loaded_steps, leftovers = 1 << 19, np.random.default_rng(0), [], 0
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    directory = tmp_path / "ckpt"
    directory.mkdir()
    path = directory / "opt.npz"
    for _ in range(12):  # kills
        child = subprocess.Popen([sys.executable, str(script), str(path), str(size)],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ready"
            # One complete save of this writer first (a save can take longer than the
            # random window on a busy machine, under ASan: then no round advanced the
            # steps and the test failed), then a kill at a random moment of the next ones.
            assert child.stdout.readline().strip() == "saved"
            time.sleep(rng.uniform(0.0, 0.15))
        finally:
            child.kill()
            child.wait()
            child.stdout.close()
        leftovers = max(leftovers, len([p for p in directory.iterdir() if p.suffix == ".tmp"]))
        target = fastadam.Adam([np.zeros(size, np.float32)], lr=0.01)
        fastadam.load(target, path)
        steps = target.state[0]["step"]
        m, v = expected_state(steps)
        assert steps >= 1
        assert (target.state[0]["exp_avg"] == m).all() and (target.state[0]["exp_avg_sq"] == v).all()
        loaded_steps.append(steps)
    assert leftovers >= 1, "no kill landed during a save: the test proved nothing"
    assert loaded_steps == sorted(loaded_steps) and loaded_steps[-1] > loaded_steps[0]
    fastadam.save(target, path)  # beside the leftovers
    fastadam.load(target, path)


def each_byte_flipped(data, seed=0):
    """``data`` with one random bit flipped, for every byte position in turn."""
    rng = np.random.default_rng(seed)
    for position, bit in enumerate(rng.integers(0, 8, len(data))):
        damaged = bytearray(data)
        damaged[position] ^= 1 << int(bit)
        yield position, bytes(damaged)


def full_snapshot(opt):
    state_dict = opt.state_dict()
    return repr(state_dict["param_groups"]), [
        (entry["step"], [entry[k].tobytes() for k in sorted(entry) if k != "step"])
        for entry in state_dict["state"].values()]


def test_a_bit_flip_anywhere_is_refused_or_harmless(tmp_path):
    # One flipped bit at every byte position of a checkpoint (a random bit each; flipping
    # all 8 bits of every byte, once, found the same outcomes). Each member of the archive (the JSON header and every
    # array) carries zip's CRC-32, which the reader verifies as it reaches the member's
    # end: a flip in any byte that carries meaning is a ValueError. The flips that load
    # are in fields zip ignores (timestamps, attributes, the local copy of a CRC); they
    # restore exactly the saved state. Never a different state, never another exception.
    params, opt = make_setup()
    for t in range(2):
        opt.step(grads_for(params, t))
    good = tmp_path / "good.npz"
    fastadam.save(opt, good)
    saved = full_snapshot(opt)
    flipped = tmp_path / "flipped.npz"
    flipped.write_bytes(good.read_bytes())
    refused = harmless = 0
    before = full_snapshot(make_setup(seed=1)[1])
    for position, data in each_byte_flipped(good.read_bytes()):
        with open(flipped, "r+b") as f:  # rewritten in place: truncating made ext4 flush
            f.write(data)
        _, target = make_setup(seed=1)
        try:
            fastadam.load(target, flipped)
        except ValueError:
            refused += 1
            assert full_snapshot(target) == before, f"a refused load at byte {position} wrote"
        else:
            harmless += 1
            assert full_snapshot(target) == saved, f"byte {position}: a different state loaded"
    assert refused > 0.8 * (refused + harmless)  # most bytes carry meaning


class _CreatesAFile:
    """Unpickling this calls open(path, "w"): code run by merely loading a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_loading_never_unpickles_code(tmp_path):
    # A file built like a checkpoint whose arrays (or header) are pickled object arrays
    # with a payload that creates a marker file when unpickled: np.load(allow_pickle=True)
    # would run it (checked first, so the payload is live); fastadam.load refuses the file
    # with ValueError and the payload never runs. fastadam.distributed reads its shard and
    # index files with the same reader (_npz.read_npz).
    params, opt = make_setup()
    opt.step(grads_for(params, 0))
    fastadam.save(opt, tmp_path / "good.npz")
    with np.load(tmp_path / "good.npz") as good:
        members = {name: good[name] for name in good.files}
    marker = tmp_path / "payload-ran"
    payload = np.array([_CreatesAFile(marker)], dtype=object)
    for target in ("state/0/exp_avg", "__fastadam__"):
        evil = tmp_path / f"evil-{target.replace('/', '-')}.npz"
        np.savez(evil, **{**members, target: payload})
        with np.load(evil, allow_pickle=True) as archive:
            archive[target]
        assert marker.exists(), "the payload is not live: this test would prove nothing"
        marker.unlink()
        with pytest.raises(ValueError, match="not a readable fastadam checkpoint"):
            fastadam.load(opt, evil)
        assert not marker.exists()


def zip_claiming(members):
    """A stored zip whose central directory claims ``claimed`` bytes for each member
    ``(name, data, claimed)`` (zip64 sizes), whatever it holds."""
    import struct
    import zlib

    body, central = bytearray(), bytearray()
    for name, data, claimed in members:
        offset, encoded, crc = len(body), name.encode(), zlib.crc32(data)
        body += struct.pack("<I5H3I2H", 0x04034B50, 45, 0, 0, 0, 0, crc, len(data), len(data),
                            len(encoded), 0) + encoded + data
        extra = struct.pack("<2H2Q", 1, 16, claimed, claimed)  # zip64: sizes
        central += struct.pack("<I6H3I5H2I", 0x02014B50, 45, 45, 0, 0, 0, 0, crc, 0xFFFFFFFF,
                               0xFFFFFFFF, len(encoded), len(extra), 0, 0, 0, 0, offset)
        central += encoded + extra
    end = struct.pack("<I4H2IH", 0x06054B50, 0, 0, len(members), len(members), len(central),
                      len(body), 0)
    return bytes(body + central + end)


def test_zip_and_npy_headers_claiming_200e9_floats_allocate_nothing(tmp_path):
    # Issue 19, item 6: a member whose zip entry AND .npy header claim 200e9 float32 (745
    # GiB) passed the old check (declared <= the zip's claimed size) and NumPy allocated
    # it: MemoryError, not ValueError. Nothing may be allocated beyond what the file holds.
    import tracemalloc

    params, opt = make_setup()
    good = tmp_path / "good.npz"
    fastadam.save(opt, good)
    with zipfile.ZipFile(good) as z:
        members = [(info.filename, z.read(info)) for info in z.infolist()]
    huge = 200 * 10**9
    for target in ("state/0/exp_avg.npy", "__fastadam__.npy"):
        data = [(name, npy_header((huge,)) + content[-64:] if name == target else content,
                 4 * huge + 128 if name == target else len(content)) for name, content in members]
        path = tmp_path / "huge.npz"
        path.write_bytes(zip_claiming(data))
        tracemalloc.start()
        try:
            with pytest.raises(ValueError, match="not a readable fastadam checkpoint.*beyond the end"):
                fastadam.load(opt, path)
            assert tracemalloc.get_traced_memory()[1] < 10**7  # peak: nothing near 745 GiB
        finally:
            tracemalloc.stop()
    # the same archive with honest sizes loads (the helper writes valid zips)
    path.write_bytes(zip_claiming([(name, content, len(content)) for name, content in members]))
    fastadam.load(opt, path)
    # a compressed member that claims more than it decompresses to: read as it really
    # decompresses, then refused
    deflated = tmp_path / "deflated.npz"
    rewrite_members(good, deflated, lambda name, data: npy_header((10**9,)) + data[-64:]
                    if name.endswith("exp_avg.npy") else data, zipfile.ZIP_DEFLATED)
    with pytest.raises(ValueError, match="declares 4000000000 bytes of data, its member holds 64"):
        fastadam.load(opt, deflated)


@pytest.mark.parametrize("field, value", [
    ("amsgrad", "yes"), ("lr", "0.1"), ("params", 5), ("betas", "ab"), ("eps", [1e-8]),
    ("steps", {"0": "x"}), ("steps", 5), ("param_groups", 3), ("weight_decay", None),
])
def test_header_fields_of_the_wrong_type_are_value_errors(tmp_path, field, value):
    # Issue 19, item 6: amsgrad="yes", lr="0.1" or params=5 in the header raised TypeError;
    # a damaged or foreign file is a ValueError, and nothing changes.
    from fastadam import _npz

    params, opt = make_setup()
    opt.step(grads_for(params, 0))
    path = tmp_path / "opt.npz"
    fastadam.save(opt, path)
    header, arrays = _npz.read_npz(str(path))
    if field in ("steps", "param_groups"):
        header[field] = value
    else:
        header["param_groups"][1][field] = value
    _npz.write_npz_atomically(path, header, arrays)
    before = opt.state_dict()
    with pytest.raises(ValueError, match="opt.npz"):
        fastadam.load(opt, path)
    after = opt.state_dict()
    assert [g["lr"] for g in after["param_groups"]] == [g["lr"] for g in before["param_groups"]]
    for i, entry in before["state"].items():
        assert all(np.array_equal(entry[k], after["state"][i][k]) for k in entry)
