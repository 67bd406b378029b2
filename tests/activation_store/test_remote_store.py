"""Reading a store from object storage (``s3://`` through fsspec) against a local S3-compatible
server (moto, on loopback only): the same rows, batches, statistics and checksum guarantees as the
local store it was uploaded from; writing to a URL is refused."""
from __future__ import annotations

import logging
import multiprocessing
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

moto_server = pytest.importorskip("moto.server", reason="reading stores from s3:// is tested against moto's S3 "
                                  "server: pip install 'moto[server]' s3fs (dev extras)")
s3fs = pytest.importorskip("s3fs", reason="reading s3:// stores needs s3fs: pip install s3fs (dev extras)")

from activation_store.errors import CorruptChunkError, NotAStoreError, StoreError  # noqa: E402
from activation_store.manifest import LayerSpec  # noqa: E402
from activation_store.reader import ActivationStore  # noqa: E402
from activation_store.remote import is_url, local_path, refuse_remote_write  # noqa: E402
from activation_store.writer import StoreWriter  # noqa: E402

BUCKET = "stores"
SEGMENT = "shards/rank-00000/seg-000000.zarr"
KINDS = {"zarr": ("zarr", None), "zarr-zstd": ("zarr", "zstd"), "hdf5": ("hdf5", None)}


@pytest.fixture(scope="module")
def endpoint():
    """A moto S3 server on 127.0.0.1 (a free port), with test credentials in the environment."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                            "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}.items():
            patch.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            patch.delenv(name, raising=False)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture(scope="module")
def options(endpoint):
    return {"endpoint_url": endpoint}


@pytest.fixture(scope="module")
def s3(options):
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir(BUCKET)
    return fs


def _write(path: Path, backend: str, compression: str | None, *, shards=(0, 1), rows=150, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    layers = {"blocks.1": LayerSpec(12, "float16", chunk_rows=32), "head": LayerSpec(5, "float32", chunk_rows=20)}
    for shard in shards:
        # three commits per shard: several segments, each with a partial last chunk
        with StoreWriter(path, model="m", layers=layers, backend=backend, compression=compression, shard=shard,
                         commit_every="60rows") as writer:
            for begin in range(0, rows, 25):
                ids = np.arange(begin, begin + 25) + 1000 * shard
                writer.write({"blocks.1": rng.standard_normal((25, 12)).astype(np.float16),
                              "head": rng.standard_normal((25, 5)).astype(np.float32)},
                             sample_ids=ids, labels=ids % 7, positions=ids % 3)
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory, s3):
    """kind -> (local path, s3 URL of its uploaded copy)."""
    out = {}
    for kind, (backend, compression) in KINDS.items():
        local = _write(tmp_path_factory.mktemp(kind) / "store", backend, compression)
        s3.put(str(local), f"{BUCKET}/{kind}", recursive=True)
        out[kind] = (local, f"s3://{BUCKET}/{kind}")
    return out


def _upload_copy(s3, local: Path, name: str) -> str:
    """A fresh copy of a store in the bucket, for a test that damages it."""
    s3.put(str(local), f"{BUCKET}/{name}", recursive=True)
    return f"s3://{BUCKET}/{name}"


def test_urls_are_told_from_paths():
    assert is_url("s3://b/x") and is_url("gs://b/x") and is_url("simplecache::s3://b/x")
    assert not is_url("/data/store") and not is_url("store") and not is_url("file:///data/store")
    assert not is_url(Path("s3:/b/x"))  # a Path already lost the URL: a (strange) local path
    assert local_path("file:///data/store") == Path("/data/store")
    with pytest.raises(ValueError, match="file:///abs/path"):
        local_path("file://otherhost/data")


@pytest.mark.parametrize("kind", list(KINDS))
def test_remote_rows_equal_local(stores, options, kind):
    local_path_, url = stores[kind]
    local = ActivationStore(local_path_)
    remote = ActivationStore(url, storage_options=options)
    assert remote.is_remote and not local.is_remote and remote.root == url
    assert remote.layers == local.layers and remote.manifest == local.manifest
    assert list(remote.shards) == list(local.shards) == ["rank-00000", "rank-00001"]
    for layer in local.layers:
        lv, rv = local[layer], remote[layer]
        assert rv.shape == lv.shape and rv.num_chunks == lv.num_chunks
        assert rv.read_rows(np.arange(rv.num_rows), raw=True).tobytes() == \
            lv.read_rows(np.arange(lv.num_rows), raw=True).tobytes()
        picked = [lv.num_rows - 1, 0, 77, 77, 31]
        np.testing.assert_array_equal(rv[picked], lv[picked])
        li, ri = lv.read_index(), rv.read_index()
        for column in ("row_ids", "sample_id", "position", "label"):
            np.testing.assert_array_equal(getattr(ri, column), getattr(li, column))
        for got, want in zip(rv.iter_chunks(shuffle=True, seed=3), lv.iter_chunks(shuffle=True, seed=3), strict=True):
            assert got.tobytes() == want.tobytes()
    report = remote.verify()
    assert report.ok and report.chunks_checked == local.verify().chunks_checked > 0
    info = remote.info()
    assert info.path == url and [layer.rows for layer in info.layers] == [layer.rows for layer in local.info().layers]
    assert info.size_bytes > 0 and url in repr(remote)


def test_remote_batches_split_by_rank_equal_local(stores, options):
    local_path_, url = stores["zarr"]
    local, remote = ActivationStore(local_path_)["blocks.1"], ActivationStore(url, storage_options=options)["blocks.1"]
    seen = []
    for rank in range(2):
        kwargs = dict(seed=5, epoch=1, shuffle_buffer_chunks=3, with_index=True, rank=rank, world_size=2)
        got, want = list(remote.iter_batches(48, **kwargs)), list(local.iter_batches(48, **kwargs))
        assert len(got) == len(want) > 0
        for a, b in zip(got, want):
            assert a.data.tobytes() == b.data.tobytes()
            np.testing.assert_array_equal(a.index.row_ids, b.index.row_ids)
            np.testing.assert_array_equal(a.index.sample_id, b.index.sample_id)
        seen.append(np.concatenate([b.index.row_ids for b in got]))
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(remote.num_rows))  # the ranks split, no overlap


def test_remote_statistics_equal_local_and_are_not_written_back(stores, options, s3):
    local_path_, url = stores["zarr"]
    want = ActivationStore(local_path_).statistics("head", use_cache=False)
    got = ActivationStore(url, storage_options=options).statistics("head")
    assert got.count == want.count and got.nonfinite_rows == want.nonfinite_rows
    np.testing.assert_array_equal(got.mean, want.mean)
    np.testing.assert_array_equal(got.variance, want.variance)
    assert not s3.exists(f"{BUCKET}/zarr/stats")  # a URL store is read-only: nothing is written there


def test_pickled_remote_store_reconnects(stores, options):
    local_path_, url = stores["zarr"]
    store = ActivationStore(url, storage_options=options)
    store["head"][0]  # opens a segment reader and the filesystem
    clone = pickle.loads(pickle.dumps(store))  # what a DataLoader worker receives
    assert clone.storage_options == options
    assert clone["head"][:].tobytes() == ActivationStore(local_path_)["head"][:].tobytes()


_FORKED: dict = {}


def _read_in_child(conn) -> None:
    try:
        conn.send(_FORKED["store"]["head"][:].tobytes())
    except BaseException as error:  # noqa: BLE001 - reported to the parent
        conn.send(error)
    finally:
        conn.close()


def test_forked_child_reads_a_store_opened_in_the_parent(stores, options):
    """A forked DataLoader worker inherits the parent's open store: it must reconnect, not reuse
    the parent's connections and event loop."""
    local_path_, url = stores["zarr"]
    store = ActivationStore(url, storage_options=options)
    store["head"][0]  # the parent's filesystem, event loop and segment readers are live
    _FORKED["store"] = store
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_read_in_child, args=(send,))
    child.start()
    send.close()
    try:
        assert receive.poll(60), "the forked child did not answer within 60 s"
        got = receive.recv()
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
        _FORKED.clear()
    assert not isinstance(got, BaseException), got
    assert got == ActivationStore(local_path_)["head"][:].tobytes()
    assert store["head"][:].tobytes() == got  # the parent's connections still work


def test_credentials_and_endpoint_from_the_environment(stores, endpoint, monkeypatch):
    local_path_, url = stores["zarr"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # botocore reads it: no storage_options needed
    store = ActivationStore(url)
    assert store["head"][:].tobytes() == ActivationStore(local_path_)["head"][:].tobytes()


def test_torch_dataset_of_a_store_with_storage_options(stores, options):
    from torch.utils.data import DataLoader

    view = ActivationStore(stores["zarr"][1], storage_options=options)["head"]
    batches = list(DataLoader(view.torch_dataset(16, shuffle=False), batch_size=None, num_workers=2))
    assert sum(len(b) for b in batches) == view.num_rows  # each worker reopened the URL with the options


def _flip_byte(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


@pytest.mark.parametrize("kind", ["zarr", "zarr-zstd"])
def test_corrupt_chunk_object_is_caught_like_a_local_file(stores, options, s3, tmp_path, kind):
    local_path_, _ = stores[kind]
    url = _upload_copy(s3, local_path_, f"corrupt-{kind}")
    damaged = Path(shutil.copytree(local_path_, tmp_path / "local"))
    key = f"{SEGMENT}/head/data/c/1/0"  # rows 20..39 of layer 'head', shard rank-00000
    at = 10 if kind == "zarr" else -3   # a data byte; in a zstd frame the checksum-less tail
    original = (damaged / key).read_bytes()
    corrupted = _flip_byte(original, at % len(original))
    (damaged / key).write_bytes(corrupted)
    s3.pipe(f"{BUCKET}/corrupt-{kind}/{key}", corrupted)

    remote, local = ActivationStore(url, storage_options=options), ActivationStore(damaged)
    report = remote.verify()
    assert [(b.layer, b.shard, b.segment, b.chunk) for b in report.bad_chunks] == [("head", "rank-00000", 0, 1)]
    assert [str(b) for b in report.bad_chunks] == [str(b) for b in local.verify().bad_chunks]
    with pytest.raises(CorruptChunkError) as remote_error:
        remote["head"].read_rows([25])
    with pytest.raises(CorruptChunkError) as local_error:
        local["head"].read_rows([25])
    assert str(remote_error.value) == str(local_error.value)
    assert "layer 'head', shard 'rank-00000', segment 0, chunk 1" in str(remote_error.value)
    np.testing.assert_array_equal(remote["head"][:20], local["head"][:20])  # other chunks still read


def test_truncated_and_missing_chunk_objects_are_named(stores, options, s3):
    local_path_, _ = stores["zarr"]
    url = _upload_copy(s3, local_path_, "missing")
    prefix = f"{BUCKET}/missing/{SEGMENT}"
    s3.pipe(f"{prefix}/blocks.1/data/c/0/0", b"\0" * 100)      # truncated
    s3.rm(f"{prefix}/head/index/c/2/0")                          # lost
    store = ActivationStore(url, storage_options=options)
    bad = {(b.layer, b.chunk): b.reason for b in store.verify().bad_chunks}
    assert set(bad) == {("blocks.1", 0), ("head", 2)}
    assert "has 100 bytes, expected 768 (truncated or overwritten)" in bad[("blocks.1", 0)]
    assert bad[("head", 2)] == f"index chunk object missing: s3://{prefix}/head/index/c/2/0"
    with pytest.raises(CorruptChunkError, match=r"chunk 2: index chunk object missing: s3://.*/head/index/c/2/0"):
        store["head"].read_index([45])


def test_missing_chunk_of_a_compressed_store_is_not_zero_filled(stores, options, s3):
    local_path_, _ = stores["zarr-zstd"]
    url = _upload_copy(s3, local_path_, "missing-zstd")
    s3.rm(f"{BUCKET}/missing-zstd/{SEGMENT}/head/data/c/0/0")
    store = ActivationStore(url, storage_options=options)
    with pytest.raises(CorruptChunkError, match=r"chunk 0: data chunk object missing: s3://"):
        store["head"].read_rows([0])
    assert [b.chunk for b in store.verify(layers=["head"]).bad_chunks] == [0]


def test_refresh_sees_a_shard_uploaded_later(options, s3, tmp_path):
    local = _write(tmp_path / "s", "zarr", None, shards=(0,), rows=50)
    url = _upload_copy(s3, local, "growing")
    store = ActivationStore(url, storage_options=options)
    assert list(store.shards) == ["rank-00000"] and store["head"].num_rows == 50
    _write(local, "zarr", None, shards=(1,), rows=50, seed=1)
    s3.put(str(local / "shards" / "rank-00001"), f"{BUCKET}/growing/shards/rank-00001", recursive=True)
    store.refresh()
    assert list(store.shards) == ["rank-00000", "rank-00001"] and store["head"].num_rows == 100
    assert store["head"][:].tobytes() == ActivationStore(local)["head"][:].tobytes()


def test_bad_locations_get_one_line_errors(endpoint, options, s3, tmp_path):
    with pytest.raises(NotAStoreError, match=r"s3://stores/nothing-here does not exist"):
        ActivationStore(f"s3://{BUCKET}/nothing-here", storage_options=options)
    s3.pipe(f"{BUCKET}/not-a-store/readme.txt", b"hello")
    with pytest.raises(NotAStoreError, match=r"is not an activation store \(no store.json\)"):
        ActivationStore(f"s3://{BUCKET}/not-a-store", storage_options=options)
    with pytest.raises(StoreError, match="cannot open nosuchproto://x with fsspec"):
        ActivationStore("nosuchproto://x")
    with pytest.raises(ValueError, match="storage_options apply to fsspec URLs"):
        ActivationStore(tmp_path, storage_options=options)
    with pytest.raises(TypeError, match="storage_options must be a dict"):
        ActivationStore(f"s3://{BUCKET}/zarr", storage_options="endpoint_url=" + endpoint)


def test_writing_to_a_url_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where Path("s3://...") would create a local "s3:" folder
    with pytest.raises(StoreError, match="writing a store is local or NFS only") as error:
        refuse_remote_write("s3://bucket/acts")
    assert "\n" not in str(error.value)
    refuse_remote_write(tmp_path / "acts")  # local paths pass


def test_store_writer_refuses_a_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where Path("s3://...") would create a local "s3:" folder
    with pytest.raises(StoreError, match="writing a store is local or NFS only"):
        StoreWriter("s3://bucket/acts", model="m", layers={"a": LayerSpec(4)}).close()
    assert not list(tmp_path.iterdir())


def test_an_sae_trains_from_the_url_as_from_the_local_store(stores, options, tmp_path):
    torch = pytest.importorskip("torch")
    from mechlens.sae import TopKConfig, TrainConfig, train_sae

    local, url = stores["zarr"]
    train = TrainConfig(steps=6, batch_size=32, lr=3e-3, device="cpu", init_rows=64)
    from_url = train_sae(ActivationStore(url, storage_options=options), "blocks.1", TopKConfig(width=24, k=3), train,
                         progress=False, out=tmp_path / "sae")
    from_disk = train_sae(local, "blocks.1", TopKConfig(width=24, k=3), train, progress=False)
    for name, value in from_disk.sae.state_dict().items():
        assert torch.equal(from_url.sae.state_dict()[name], value), name  # the same rows in the same order
    assert url in (tmp_path / "sae" / "config.json").read_text()  # the SAE records where it was trained
