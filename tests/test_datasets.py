"""The IDX loader, on small files the tests write (and the real files when installed)."""

import gzip

import numpy as np
import pytest

from fastadam.app import datasets


def write_idx(path, array, gz=True):
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    header += np.array(array.shape, ">u4").tobytes()
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def write_split(directory, split, n=5, gz=True):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    image_name, label_name = datasets.FILES[split]
    suffix = ".gz" if gz else ""
    write_idx(directory / f"{image_name}{suffix}", images, gz)
    write_idx(directory / f"{label_name}{suffix}", labels, gz)
    return images, labels


@pytest.mark.parametrize("array", [np.arange(24, dtype=np.int32).reshape(2, 3, 4),
                                   np.linspace(0, 1, 6, dtype=np.float32), np.zeros((0, 3), np.uint8)])
@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trips(tmp_path, array, gz):
    path = write_idx(tmp_path / ("a.gz" if gz else "a"), array, gz)
    result = datasets.read_idx(path)
    assert result.dtype == array.dtype and result.dtype.isnative
    np.testing.assert_array_equal(result, array)


def test_truncated_and_foreign_files_are_value_errors(tmp_path):
    path = write_idx(tmp_path / "a", np.arange(100, dtype=np.uint8), gz=False)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        datasets.read_idx(path)
    (tmp_path / "b").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(ValueError, match="not an IDX file"):
        datasets.read_idx(tmp_path / "b")
    (tmp_path / "c.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="not a readable IDX file"):
        datasets.read_idx(tmp_path / "c.gz")


@pytest.mark.parametrize("gz", [True, False])
def test_load_from_data_dir(tmp_path, gz):
    images, labels = write_split(tmp_path, "test", gz=gz)
    got_images, got_labels = datasets.load_fashion_mnist("test", data_dir=tmp_path)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_environment_variable_and_missing_files(tmp_path, monkeypatch):
    write_split(tmp_path, "train")
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    monkeypatch.setattr(datasets, "DEBIAN_DIR", tmp_path / "nowhere")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert datasets.load_fashion_mnist("train")[0].shape == (5, 28, 28)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        datasets.load_fashion_mnist("test")
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        datasets.load_fashion_mnist("validation")


def test_download_from_a_mirror(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    write_split(mirror, "train")
    images, _ = write_split(mirror, "test")
    target = tmp_path / "data"
    datasets.download_fashion_mnist(target, base_url=mirror.as_uri() + "/")
    np.testing.assert_array_equal(datasets.load_fashion_mnist("test", data_dir=target)[0], images)


def test_download_without_data_dir_uses_files_found_else_the_cache(tmp_path, monkeypatch):
    # Files already found (say in Debian's directory) are used: no data_dir is needed and
    # nothing is fetched (issue 23: this was "download=True needs a data_dir").
    found = tmp_path / "debian"
    found.mkdir()
    images, _ = write_split(found, "test")
    monkeypatch.setattr(datasets, "DEBIAN_DIR", found)
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    fetched = []
    monkeypatch.setattr(datasets, "download_fashion_mnist", lambda d, *a: fetched.append(d))
    np.testing.assert_array_equal(datasets.load_fashion_mnist("test", download=True)[0], images)
    assert fetched == []
    # Not found anywhere: fetched into the cache, where later calls find them.
    monkeypatch.setattr(datasets, "DEBIAN_DIR", tmp_path / "nowhere")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    write_split(mirror, "train")
    images, _ = write_split(mirror, "test")
    monkeypatch.setattr(datasets, "download_fashion_mnist", lambda d: real_download(d, mirror.as_uri() + "/"))
    np.testing.assert_array_equal(datasets.load_fashion_mnist("test", download=True)[0], images)
    assert datasets.cache_dir() == tmp_path / "cache" / "fastadam" / "fashion-mnist"
    assert (datasets.cache_dir() / "t10k-images-idx3-ubyte.gz").exists()
    np.testing.assert_array_equal(datasets.load_fashion_mnist("test")[0], images)


real_download = datasets.download_fashion_mnist


def test_a_failed_download_is_a_download_error_naming_the_url(tmp_path):
    # No network, or nothing at the URL: a DownloadError (an OSError) that names the URL,
    # not urllib's URLError traceback; no partial file is left behind.
    with pytest.raises(datasets.DownloadError, match=r"could not download file:.*t.*-ubyte\.gz"):
        datasets.download_fashion_mnist(tmp_path / "data", base_url=(tmp_path / "void").as_uri() + "/")
    assert list((tmp_path / "data").iterdir()) == []


@pytest.mark.skipif(not (datasets.DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_the_real_test_split():
    images, labels = datasets.load_fashion_mnist("test", data_dir=datasets.DEBIAN_DIR)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert sorted(np.bincount(labels)) == [1000] * 10
