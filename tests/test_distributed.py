"""fastadam.distributed: sharded Adam over MPI.

The multi-rank behaviour runs under ``mpiexec -n 2`` and ``-n 3`` (tests/mpi_worker.py, which
checks every rank against a single-process fastadam.Adam, bit for bit); argument checks,
the shard formula and one-rank parity run here, on MPI.COMM_SELF.
"""

import array
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastadam

HAVE_MPI4PY = importlib.util.find_spec("mpi4py") is not None
needs_mpi = pytest.mark.skipif(not HAVE_MPI4PY, reason="mpi4py is not installed (pip install mpi4py mpich)")
WORKER = Path(__file__).with_name("mpi_worker.py")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "distributed_mpi.py"


def find_mpiexec():
    """The mpiexec next to this Python (pip's mpich installs it there), else on PATH."""
    beside = Path(sys.executable).with_name("mpiexec")
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if found is None:
        pytest.fail("mpi4py is installed but no mpiexec was found next to sys.executable or "
                    "on PATH (pip install mpich provides one)")
    return found


def mpiexec(n, *args, timeout=180):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    result = subprocess.run([find_mpiexec(), "-n", str(n), sys.executable, *map(str, args)],
                            capture_output=True, text=True, timeout=timeout, env=env)
    return result


def run_worker(n, scenario, *args, timeout=180):
    result = mpiexec(n, WORKER, scenario, *args, timeout=timeout)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no report (exit {result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    report = json.loads(lines[-1])
    assert report["failures"] == [], "\n".join(report["failures"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert report["world_size"] == n
    return report


# --- import guard ------------------------------------------------------------------------


def test_import_fastadam_never_imports_mpi4py():
    code = "import sys, fastadam; print('mpi4py' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_without_mpi4py_the_import_error_says_what_to_install():
    code = ("import sys; sys.modules['mpi4py'] = None\n"
            "try:\n    import fastadam.distributed\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install mpi4py mpich" in out.stdout


# --- across ranks (mpiexec) ----------------------------------------------------------------


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_every_rank_matches_one_process_bit_for_bit(ranks):
    report = run_worker(ranks, "parity")
    # 100003 float32 elements in 64-byte blocks: the first ranks one block more, the last short
    expected = {2: [[0, 50016], [50016, 100003]],
                3: [[0, 33344], [33344, 66688], [66688, 100003]]}[ranks]
    assert report["bounds"] == expected
    assert report["order_sensitive_sum_bit_exact"]["fastadam"] is True


@needs_mpi
def test_checkpoints_restore_exactly_and_reshard_between_2_and_3_ranks(tmp_path):
    report = run_worker(3, "checkpoint", tmp_path)
    assert report["files_saved_by_two"] == ["index.npz"] + sorted(
        n for n in report["files_saved_by_two"] if n.startswith("shard-"))
    assert len(report["files_saved_by_two"]) == 3
    missing, corrupt = report["errors"]
    assert missing.startswith("FileNotFoundError") and "index.npz" in missing
    assert corrupt.startswith("ValueError") and "shard-" in corrupt


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_a_bad_argument_on_one_rank_raises_on_every_rank_and_nothing_hangs(ranks, tmp_path):
    # Issue 19, item 3: bad grads, lr=-1 or a different skip_if_nonfinite on rank 1 alone
    # raised there while the other ranks waited in a collective until killed, and an lr
    # that differed between ranks raised nothing. A hang fails here by the timeout
    # (killing mpiexec ends its ranks).
    try:
        report = run_worker(ranks, "disagree", tmp_path, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the ranks hung for 120 s on {ranks} ranks: one rank's error did not reach the others")
    messages = report["messages"]
    assert len(messages) == ranks
    for rank, mine in enumerate(messages):
        assert len(mine) == 13, mine  # every case raised on every rank
        if rank != 1:
            assert "rank 1" in mine["bad grads on one rank"]
            assert mine["lr differs"].startswith("construct ShardedAdam: every rank must have the same lr")
    assert "rank 1: lr=9.99" in messages[0]["lr differs"]


@needs_mpi
def test_torch_model_parameters_across_2_ranks():
    pytest.importorskip("torch")
    run_worker(2, "torch")


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_16_bit_models_with_float32_master_shards_match_one_process(ranks, tmp_path):
    report = run_worker(ranks, "half", tmp_path)
    # 100003 bfloat16 elements in 64-byte blocks of 32
    expected = {2: [[0, 50016], [50016, 100003]],
                3: [[0, 33344], [33344, 66688], [66688, 100003]]}[ranks]
    assert report["half_bounds"] == expected
    if ranks == 2:
        assert report["half_mpi_collectives_bit_exact"] is True


@needs_mpi
def test_bfloat16_torch_model_across_2_ranks():
    pytest.importorskip("torch")
    run_worker(2, "torch_half")


@needs_mpi
def test_example_trains_across_2_ranks():
    result = mpiexec(2, EXAMPLE, "--quick", "--no-progress", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "2 ranks" in out
    assert "parameters identical on every rank: yes" in out
    accuracy = float(out.split("test accuracy ")[-1].split()[0])
    assert accuracy > 0.5  # ten classes: chance is 0.1


# --- one rank, in this process ----------------------------------------------------------------


@pytest.fixture(scope="module")
def dist():
    if not HAVE_MPI4PY:
        pytest.skip("mpi4py is not installed (pip install mpi4py mpich)")
    import fastadam.distributed

    return fastadam.distributed


@pytest.fixture(scope="module")
def comm(dist):
    from mpi4py import MPI

    return MPI.COMM_SELF


@pytest.mark.parametrize("total", [0, 1, 15, 16, 17, 1037, 100003])
@pytest.mark.parametrize("world_size", [1, 2, 3, 7, 64])
@pytest.mark.parametrize("align", [1, 8, 16])
def test_shard_bounds_split_blocks_like_array_split(dist, total, world_size, align):
    bounds = dist.shard_bounds(total, world_size, align)
    blocks = -(-total // align)
    expected = [(min(align * int(c[0]), total), min(align * (int(c[-1]) + 1), total)) if c.size else None
                for c in np.array_split(np.arange(blocks), world_size)]
    assert len(bounds) == world_size
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    for (start, stop), (next_start, _), want in zip(bounds, bounds[1:] + [(total, total)], expected):
        assert start <= stop == next_start
        assert start % align == 0 or start == total
        if want is not None:
            assert (start, stop) == want
        else:
            assert start == stop == total


@pytest.mark.parametrize("args, error, name", [
    ((-1, 2), ValueError, "total"), ((10, 0), ValueError, "world_size"),
    ((10, 2, 0), ValueError, "align"), ((10.0, 2), TypeError, "total"),
    ((10, True), TypeError, "world_size"),
])
def test_shard_bounds_rejects_bad_arguments(dist, args, error, name):
    with pytest.raises(error, match=name):
        dist.shard_bounds(*args)


KWARGS = [{}, {"amsgrad": True, "weight_decay": 0.1}, {"decoupled_weight_decay": True, "weight_decay": 0.1},
          {"eps_root": 1e-10, "maximize": True}]


@pytest.mark.parametrize("kwargs", KWARGS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_rank_is_fastadam_adam(dist, comm, kwargs, dtype):
    rng = np.random.default_rng(1)
    flat = fastadam.FlatParams([(5, 7), 3], dtype)
    flat.data[...] = rng.standard_normal(flat.data.size)
    reference = flat.data.copy()
    opt = dist.ShardedAdam(flat, comm, lr=0.01, **kwargs)
    ref = fastadam.Adam([reference], lr=0.01, **kwargs)
    for _ in range(3):
        flat.grad_data[...] = rng.standard_normal(flat.data.size)
        assert opt.step(grad_scale=2.0)
        ref.step([flat.grad_data], grad_scale=2.0)
    assert flat.data.tobytes() == reference.tobytes()
    assert opt.state["step"] == 3 and opt.bounds == [(0, 38)] and opt.shard == (0, 38)
    assert opt.state_nbytes == flat.data.nbytes * (3 if kwargs.get("amsgrad") else 2)
    assert opt.scratch_nbytes == 0  # one rank reads the gradient in place
    assert set(opt.seconds) == {"reduce", "update", "gather"}
    assert "rank 0 of 1" in repr(opt)


def test_buffer_protocol_params_are_updated_in_place(dist, comm):
    params = array.array("f", [1.0, 2.0, 3.0])
    opt = dist.ShardedAdam(params, comm, lr=0.5)
    assert opt.params.ctypes.data == params.buffer_info()[0]  # zero-copy
    reference = np.array([1.0, 2.0, 3.0], np.float32)
    opt.step(array.array("f", [1.0, -1.0, 0.0]))
    fastadam.Adam([reference], lr=0.5).step([np.array([1.0, -1.0, 0.0], np.float32)])
    assert np.frombuffer(params, np.float32).tobytes() == reference.tobytes()
    assert np.allclose(reference, [0.5, 2.5, 3.0])


def test_hyperparameters_may_be_edited_between_steps(dist, comm):
    params = np.zeros(4)
    opt = dist.ShardedAdam(params, comm, lr=0.5)
    opt.param_groups[0]["lr"] = 0.25
    opt.step(np.ones(4))
    reference = np.zeros(4)
    fastadam.Adam([reference], lr=0.25).step([np.ones(4)])
    assert params.tobytes() == reference.tobytes()


def bad_constructions(dist, comm):
    return [
        (lambda: dist.ShardedAdam(np.zeros(4), "world"), TypeError, "comm"),
        (lambda: dist.ShardedAdam(np.zeros(4), comm, collectives="fast"), ValueError, "collectives"),
        (lambda: dist.ShardedAdam([np.zeros(4)], comm), TypeError, "FlatParams.from_arrays"),
        (lambda: dist.ShardedAdam(np.zeros((2, 2)), comm), ValueError, "params"),
        (lambda: dist.ShardedAdam(np.zeros(4, np.int32), comm), TypeError, "params"),
        (lambda: dist.ShardedAdam(np.zeros(4), comm, lr=-1.0), ValueError, "lr"),
        (lambda: dist.ShardedAdam(np.frombuffer(bytes(16), np.float32), comm), ValueError, "writable"),
    ]


def test_bad_constructions_raise_naming_the_argument(dist, comm):
    for make, error, name in bad_constructions(dist, comm):
        with pytest.raises(error, match=name):
            make()


def test_rejected_steps_change_nothing(dist, comm):
    flat = fastadam.FlatParams([6], np.float32)
    flat.data[...] = 1.0
    bare = np.ones(6, np.float32)
    opt = dist.ShardedAdam(flat, comm, amsgrad=True)
    bare_opt = dist.ShardedAdam(bare, comm)
    flat.grad_data[...] = 1.0
    opt.step()
    snapshot = [flat.data.copy(), *(np.copy(v) for k, v in opt.state.items() if k != "step")]
    bad = [
        (lambda: opt.step(np.ones(6, np.float64)), TypeError, "grads"),
        (lambda: opt.step(np.ones(5, np.float32)), ValueError, "grads"),
        (lambda: opt.step(np.ones((2, 3), np.float32)), ValueError, "grads"),
        (lambda: opt.step(flat.data), ValueError, "overlaps"),
        (lambda: opt.step(grad_scale=0.0), ValueError, "grad_scale"),
        (lambda: opt.step(skip_if_nonfinite=1), TypeError, "skip_if_nonfinite"),
        (lambda: bare_opt.step(), ValueError, "grads is required"),
    ]
    for call, error, name in bad:
        with pytest.raises(error, match=name):
            call()
    opt.param_groups[0]["betas"] = (1.5, 0.999)
    with pytest.raises(ValueError, match="betas"):
        opt.step()
    after = [flat.data, *(v for k, v in opt.state.items() if k != "step")]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(snapshot, after))
    assert opt.state["step"] == 1


def test_one_rank_checkpoint_round_trip_and_errors(dist, comm, tmp_path):
    params = np.linspace(-1, 1, 50)
    opt = dist.ShardedAdam(params, comm, lr=fastadam.schedules.inverse_sqrt(0.1), amsgrad=True)
    for _ in range(2):
        opt.step(np.sin(params))
    dist.save(opt, tmp_path)
    again = dist.ShardedAdam(params.copy(), comm, lr=fastadam.schedules.inverse_sqrt(0.1), amsgrad=True)
    dist.load(again, tmp_path)
    for key, value in opt.state.items():
        assert np.array_equal(value, again.state[key])
    opt.step(np.cos(params))
    again.step(np.cos(again.params))
    assert opt.params.tobytes() == again.params.tobytes()

    with pytest.raises(TypeError, match="opt"):
        dist.save(fastadam.Adam([np.zeros(2)]), tmp_path)
    with pytest.raises(FileNotFoundError):
        dist.load(again, tmp_path / "nowhere")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    fastadam.save(fastadam.Adam([np.zeros(2)]), foreign / "index.npz")
    with pytest.raises(ValueError, match="not a fastadam sharded checkpoint"):
        dist.load(again, foreign)
    other_dtype = dist.ShardedAdam(np.zeros(50, np.float32), comm)
    with pytest.raises(ValueError, match="float64"):
        dist.load(other_dtype, tmp_path)


def test_save_removes_only_the_files_it_wrote(dist, comm, tmp_path):
    # Issue 19, item 2: save removed every file named shard-* in the directory; a user's
    # shard-00000-of-00002.tar was lost. Now only the replaced checkpoint's shards (its
    # index names them) and shards of an interrupted save (fastadam's name and header) go.
    params = np.linspace(-1, 1, 50)
    opt = dist.ShardedAdam(params, comm, lr=0.1)
    opt.step(np.sin(params))
    users = {"shard-00000-of-00002.tar": b"user data", "shard-notes.txt": b"notes",
             "shard-0123456789abcdef-00000.npz": b"not a zip", "index.npz.bak": b"backup"}
    for name, data in users.items():
        (tmp_path / name).write_bytes(data)
    dist.save(opt, tmp_path)
    first = {p.name for p in tmp_path.iterdir()} - set(users) - {"index.npz"}
    assert len(first) == 1  # this checkpoint's one shard
    # an interrupted save of another checkpoint left a shard (fastadam's name and header)
    from fastadam._npz import write_npz_atomically
    from fastadam.distributed import _checkpoint

    write_npz_atomically(tmp_path / "shard-00000000deadbeef-00000.npz",
                         {"format": _checkpoint.SHARD_FORMAT, "id": "00000000deadbeef"}, {})
    dist.save(opt, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {n: (tmp_path / n).read_bytes() for n in users} == users
    assert len(names - set(users)) == 2 and "index.npz" in names
    assert not names & ({"shard-00000000deadbeef-00000.npz"} | first)
    again = dist.ShardedAdam(params.copy(), comm, lr=0.1)
    dist.load(again, tmp_path)
    assert again.state["step"] == 1


def test_torch_parameters_must_be_dense_cpu_float_of_one_dtype(dist, comm):
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="dtype float32, float64, bfloat16 or float16"):
        dist.ShardedAdam([torch.zeros(3, dtype=torch.int32)], comm)
    half = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    pointer = half.data_ptr()
    with pytest.raises(TypeError, match="pass master_weights=True"):
        dist.ShardedAdam([half], comm)
    assert half.data_ptr() == pointer  # refused before the tensor was moved
    with pytest.raises(TypeError, match="one dtype"):
        dist.ShardedAdam([torch.zeros(3), torch.zeros(3, dtype=torch.float64)], comm)
    with pytest.raises(TypeError, match="dense CPU"):
        dist.ShardedAdam([torch.zeros(3).to_sparse()], comm)
    weight = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="overlaps"):
        dist.ShardedAdam([weight, weight], comm)
    pointer = weight.data_ptr()
    with pytest.raises(ValueError, match="lr"):
        dist.ShardedAdam([weight], comm, lr=-1.0)
    assert weight.data_ptr() == pointer  # a rejected construction moved nothing
    weight.grad = torch.full((3,), 2.0)
    opt = dist.ShardedAdam([weight], comm, lr=0.5)
    assert weight.grad.data_ptr() == opt.grads.ctypes.data  # .grad became a view of the block
    opt.step()
    reference = np.ones(3, np.float32)
    fastadam.Adam([reference], lr=0.5).step([np.full(3, 2.0, np.float32)])
    assert weight.detach().numpy().tobytes() == reference.tobytes()
    weight.grad = torch.full((3,), -3.0)  # a new tensor (not the block's view): copied in
    opt.step()
    assert np.all(opt.grads == -3.0)
    weight.grad = None  # no gradient: zero
    opt.step()
    assert np.all(opt.grads == 0.0)
    weight.grad = torch.ones(3).to_sparse()
    with pytest.raises(TypeError, match=r"params\[0\].grad is sparse"):
        opt.step()
    weight.data = weight.data.clone()
    with pytest.raises(ValueError, match=r"params\[0\] no longer lives"):
        opt.step()


# --- 16-bit models with float32 master shards, one rank -----------------------------------------


def half_dtypes():
    from fastadam._validation import check_element_dtype

    return [check_element_dtype("bfloat16"), np.dtype(np.float16)]


@pytest.mark.parametrize("kwargs", KWARGS)
@pytest.mark.parametrize("which", [0, 1])
def test_one_rank_16_bit_model_is_fastadam_adam_with_master_weights(dist, comm, kwargs, which):
    dtype = half_dtypes()[which]
    rng = np.random.default_rng(2)
    flat = fastadam.FlatParams([(5, 7), 3], dtype)
    flat.data[...] = rng.standard_normal(flat.data.size).astype(dtype)
    reference = flat.data.copy()
    opt = dist.ShardedAdam(flat, comm, lr=0.01, master_weights=True, **kwargs)
    ref = fastadam.Adam([reference], lr=0.01, master_weights=True, **kwargs)
    assert opt.state["master_param"].tobytes() == flat.data.astype(np.float32).tobytes()
    for _ in range(3):
        flat.grad_data[...] = rng.standard_normal(flat.data.size).astype(dtype)
        assert opt.step(grad_scale=2.0)
        ref.step([flat.grad_data], grad_scale=2.0)
    assert flat.data.tobytes() == reference.tobytes()
    for key, value in ref.state[0].items():
        if key != "step":
            assert value.dtype == np.float32 and opt.state[key].tobytes() == value.tobytes(), key
    keys = 4 if kwargs.get("amsgrad") else 3  # the moments and the master copy, float32
    assert opt.state_nbytes == flat.data.size * 4 * keys
    assert opt.master_weights and "master_weights=True" in repr(opt)


def test_16_bit_models_need_master_weights_and_bad_combinations_change_nothing(dist, comm):
    bf16, f16 = half_dtypes()
    params = np.ones(8, bf16)
    for make, error, message in [
        (lambda: dist.ShardedAdam(params, comm), TypeError, "bfloat16: .* pass master_weights=True"),
        (lambda: dist.ShardedAdam(np.ones(8, np.float32), comm, master_weights=True), TypeError,
         "master_weights is for bfloat16 and float16 params, but params are float32"),
        (lambda: dist.ShardedAdam(params, comm, master_weights="yes"), TypeError, "master_weights"),
    ]:
        with pytest.raises(error, match=message):
            make()
    assert np.all(params.astype(np.float32) == 1.0)
    opt = dist.ShardedAdam(params, comm, lr=0.1, master_weights=True)
    opt.step(np.ones(8, bf16))
    snapshot = [params.copy(), *(np.copy(v) for k, v in opt.state.items() if k != "step")]
    for grads, error, message in [
        (np.ones(8, np.float32), TypeError, r"grads must have the dtype of params \(bfloat16\), got float32"),
        (np.ones(8, f16), TypeError, "got float16"),
        (np.ones(7, bf16), ValueError, "8 elements"),
    ]:
        with pytest.raises(error, match=message):
            opt.step(grads)
    with pytest.raises(ValueError, match="grad_scale"):
        opt.step(np.ones(8, bf16), grad_scale=1e39)  # beyond float32, the math type
    after = [params, *(v for k, v in opt.state.items() if k != "step")]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(snapshot, after))
    assert opt.state["step"] == 1


def test_one_rank_16_bit_checkpoint_round_trips_bit_for_bit(dist, comm, tmp_path):
    bf16, f16 = half_dtypes()
    rng = np.random.default_rng(3)
    params = rng.standard_normal(50).astype(bf16)
    opt = dist.ShardedAdam(params, comm, lr=0.1, amsgrad=True, master_weights=True)
    for _ in range(2):
        opt.step(rng.standard_normal(50).astype(bf16))
    dist.save(opt, tmp_path)
    again = dist.ShardedAdam(params.copy(), comm, lr=0.1, amsgrad=True, master_weights=True)
    dist.load(again, tmp_path)
    assert set(again.state) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param"}
    for key, value in opt.state.items():
        assert np.asarray(value).tobytes() == np.asarray(again.state[key]).tobytes(), key
    grad = rng.standard_normal(50).astype(bf16)
    opt.step(grad)
    again.step(grad)
    assert opt.params.tobytes() == again.params.tobytes()
    # another dtype's checkpoint is refused, changing nothing
    half = dist.ShardedAdam(np.zeros(50, f16), comm, master_weights=True)
    with pytest.raises(ValueError, match="50 x bfloat16 parameters, the optimizer has 50 x float16"):
        dist.load(half, tmp_path)
    assert half.state["step"] == 0 and not half.state["master_param"].any()
