"""The prepare stage's library code on tiny data in the real CIFAR-10 formats (see cifar_fixtures)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import struct
import tarfile
import tracemalloc

import numpy as np
import pytest
import yaml
from cifar_fixtures import (
    cifar_batch_bytes,
    make_cifar_arrays,
    malicious_batch_bytes,
    write_cifar_folder,
    write_cifar_npz,
    write_cifar_tar,
)
from typer.testing import CliRunner

from ddim_denoise.cli import app
from ddim_denoise.data import cifar10 as data
from ddim_denoise.data import prepared
from ddim_denoise.pipeline.errors import DataError
from ddim_denoise.pipeline.files import MANIFEST_FILE
from ddim_denoise.pipeline.params import validate_params

N_PER_BATCH, N_TEST, VAL_SIZE = 6, 4, 6
N_TRAIN = len(data.TRAIN_BATCHES) * N_PER_BATCH
WRITERS = {"tar": write_cifar_tar, "folder": write_cifar_folder, "npz": write_cifar_npz}


def params_for(tmp_path, seed=0, val_size=VAL_SIZE, download=False):
    return validate_params({"seed": seed, "data": {"raw_dir": str(tmp_path / "raw"), "download": download,
                                                   "prepared_dir": str(tmp_path / "prepared"), "val_size": val_size}})


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """No test may reach the internet: a download attempt fails as it does offline."""

    def offline(raw_dir):
        raise OSError("network is unreachable")

    monkeypatch.setattr(data, "_download_official", offline)


@pytest.mark.parametrize("kind", list(WRITERS))
def test_every_source_kind_loads_the_same_images(tmp_path, kind):
    WRITERS[kind](tmp_path, N_PER_BATCH, N_TEST)
    source = data.find_source(tmp_path)
    loaded = data.load_source(source)
    assert source.kind == kind
    for key, expected in make_cifar_arrays(N_PER_BATCH, N_TEST).items():
        got = getattr(loaded, key)
        assert got.dtype == np.uint8 and np.array_equal(got, expected), key


def test_official_archive_is_preferred_over_folder_and_npz(tmp_path):
    write_cifar_npz(tmp_path)
    write_cifar_folder(tmp_path)
    assert data.find_source(tmp_path).kind == "folder"
    write_cifar_tar(tmp_path)
    assert data.find_source(tmp_path).kind == "tar"


def test_several_npz_files_without_the_preferred_name_are_ambiguous(tmp_path):
    write_cifar_npz(tmp_path, name="a.npz")
    write_cifar_npz(tmp_path, name="b.npz")
    with pytest.raises(DataError, match=r"several \.npz.*a\.npz, b\.npz"):
        data.find_source(tmp_path)


def test_split_is_seeded_disjoint_and_complete():
    train, val = data.split_indices(N_TRAIN, VAL_SIZE, seed=0)
    again_train, again_val = data.split_indices(N_TRAIN, VAL_SIZE, seed=0)
    _, other_val = data.split_indices(N_TRAIN, VAL_SIZE, seed=1)
    assert np.array_equal(val, again_val) and np.array_equal(train, again_train)
    assert not np.array_equal(val, other_val)
    assert len(val) == VAL_SIZE and np.array_equal(np.sort(np.concatenate([train, val])), np.arange(N_TRAIN))


@pytest.mark.parametrize("val_size", [N_TRAIN, N_TRAIN + 1])
def test_validation_set_must_leave_training_images(tmp_path, val_size):
    write_cifar_npz(tmp_path / "raw", N_PER_BATCH, N_TEST)
    with pytest.raises(DataError, match=f"data.val_size={val_size} .*{N_TRAIN} training images"):
        prepared.prepare(params_for(tmp_path, val_size=val_size))


def labelled_images(x, y) -> list[bytes]:
    """Each image with its label, in a canonical order: equal lists mean the same labelled images."""
    return sorted(image.tobytes() + bytes([label]) for image, label in zip(x, y))


def test_prepare_writes_uint8_splits_and_a_manifest(tmp_path):
    archive = write_cifar_tar(tmp_path / "raw", N_PER_BATCH, N_TEST)
    manifest = prepared.prepare(params_for(tmp_path))

    expected = make_cifar_arrays(N_PER_BATCH, N_TEST)
    splits = {split: prepared.load_split(tmp_path / "prepared", split) for split in prepared.SPLITS}
    for x, y in splits.values():
        assert x.dtype == np.uint8 and y.dtype == np.uint8 and x.shape[1:] == data.IMAGE_SHAPE and len(x) == len(y)
    assert {s: len(x) for s, (x, _) in splits.items()} == {"train": N_TRAIN - VAL_SIZE, "val": VAL_SIZE,
                                                           "test": N_TEST}
    assert np.array_equal(splits["test"][0], expected["x_test"])
    assert np.array_equal(splits["test"][1], expected["y_test"])
    train_and_val = [np.concatenate(parts) for parts in zip(splits["train"], splits["val"])]
    assert labelled_images(*train_and_val) == labelled_images(expected["x_train"], expected["y_train"])

    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert manifest == json.loads((tmp_path / "prepared" / MANIFEST_FILE).read_text())
    assert manifest["dataset_sha256"] == sha and manifest["source"] == {
        "kind": "tar", "path": str(archive), "sha256": {archive.name: sha}}
    assert manifest["counts"] == {"train": N_TRAIN - VAL_SIZE, "val": VAL_SIZE, "test": N_TEST}
    assert not [p.name for p in (tmp_path / "prepared").iterdir() if p.name.startswith(".")]  # no temp files left


def write_originals(path, k: int, k_test: int = 2, shift: int = 3) -> tuple:
    """An .npz whose x_train / x_test = the first k / k_test images of each split, every value moved by ``shift``
    (a "lossless" twin of a lossy copy)."""
    arrays = make_cifar_arrays(N_PER_BATCH, N_TEST)
    twins = {key: np.clip(arrays[key][:n].astype(np.int16) + shift, 0, 255).astype(np.uint8)
             for key, n in (("x_train", k), ("x_test", k_test))}
    np.savez(path, **twins)
    return path, twins["x_train"], twins["x_test"]


def test_originals_replace_their_jpeg_twins_and_can_form_the_training_set_alone(tmp_path):
    write_cifar_npz(tmp_path / "raw", N_PER_BATCH, N_TEST)
    plain = prepared.prepare(params_for(tmp_path))
    path, originals, test_originals = write_originals(tmp_path / "originals.npz", k=12)
    idx_train, idx_val = data.split_indices(N_TRAIN, VAL_SIZE, 0)
    arrays = make_cifar_arrays(N_PER_BATCH, N_TEST)
    expected, expected_test = arrays["x_train"], arrays["x_test"]
    expected[:12], expected_test[:2] = originals, test_originals

    params = params_for(tmp_path)
    params.data.originals, params.data.val_split = str(path), "random"
    manifest = prepared.prepare(params)
    assert np.array_equal(prepared.load_split(tmp_path / "prepared", "train")[0], expected[idx_train])
    assert np.array_equal(prepared.load_split(tmp_path / "prepared", "val")[0], expected[idx_val])
    assert np.array_equal(prepared.load_split(tmp_path / "prepared", "test")[0], expected_test)
    assert manifest["originals"]["count"] == 12 and manifest["originals"]["test_count"] == 2
    assert manifest["dataset_sha256"] != plain["dataset_sha256"]

    params.data.originals_only = True
    manifest = prepared.prepare(params)
    only = idx_train[idx_train < 12]
    assert 0 < len(only) < len(idx_train)
    assert np.array_equal(prepared.load_split(tmp_path / "prepared", "train")[0], expected[only])
    assert manifest["counts"]["train"] == len(only) and manifest["counts"]["val"] == VAL_SIZE


def test_validation_on_originals_is_their_last_images_and_leaves_training(tmp_path):
    """data/raw/originals.npz is found by data.originals=auto, and validation (val_split=auto) is taken from it."""
    write_cifar_npz(tmp_path / "raw", N_PER_BATCH, N_TEST)
    _, originals, _ = write_originals(tmp_path / "raw" / data.ORIGINALS_NPZ, k=12)
    manifest = prepared.prepare(params_for(tmp_path, val_size=4))
    val = prepared.load_split(tmp_path / "prepared", "val")[0]
    train = prepared.load_split(tmp_path / "prepared", "train")[0]
    assert manifest["val_split"] == "originals" and manifest["source"]["path"].endswith("cifar10.npz")
    assert np.array_equal(val, originals[8:12]) and len(train) == N_TRAIN - 4
    assert not any((image == train).all(axis=(1, 2, 3)).any() for image in val)
    random = params_for(tmp_path, val_size=4)
    random.data.val_split = "random"
    # no resume across the two
    assert prepared.data_identity(prepared.prepare(random)) != prepared.data_identity(manifest)


def test_validation_on_originals_needs_enough_of_them(tmp_path):
    write_cifar_npz(tmp_path / "raw", N_PER_BATCH, N_TEST)
    params = params_for(tmp_path, val_size=12)
    params.data.originals, params.data.val_split = str(write_originals(tmp_path / "o.npz", k=12)[0]), "originals"
    with pytest.raises(DataError, match="val_split=originals takes data.val_size=12 of the 12 original"):
        prepared.prepare(params)
    params.data.originals = None
    with pytest.raises(DataError, match="takes data.val_size=12 of the 0 original"):
        prepared.prepare(params)


def test_originals_of_other_images_are_refused(tmp_path):
    write_cifar_npz(tmp_path / "raw", N_PER_BATCH, N_TEST)
    params = params_for(tmp_path)
    params.data.originals = str(write_originals(tmp_path / "originals.npz", k=12, shift=128)[0])
    with pytest.raises(DataError, match="its x_train is not the first 12 images"):
        prepared.prepare(params)
    params.data.originals = str(tmp_path / "missing.npz")
    with pytest.raises(DataError, match="missing.npz not found"):
        prepared.prepare(params)


def test_prepare_is_reproducible_per_seed(tmp_path):
    write_cifar_npz(tmp_path / "raw", N_PER_BATCH, N_TEST)
    val = {}
    for seed in (0, 0, 1):
        prepared.prepare(params_for(tmp_path, seed=seed))
        val.setdefault(seed, []).append(prepared.load_split(tmp_path / "prepared", "val")[0])
    assert np.array_equal(*val[0]) and not np.array_equal(val[0][0], val[1][0])


def test_folder_hash_covers_the_batch_files_in_sorted_order(tmp_path):
    folder = write_cifar_folder(tmp_path)
    digest, files = data.source_digests(data.find_source(tmp_path))
    contents = b"".join((folder / name).read_bytes() for name in sorted(data.BATCH_NAMES))
    assert digest == hashlib.sha256(contents).hexdigest() and sorted(files) == sorted(data.BATCH_NAMES)


def test_load_split_says_to_run_prepare_first(tmp_path):
    with pytest.raises(DataError, match="run `ddim-denoise prepare`"):
        prepared.load_split(tmp_path / "prepared", "train")


@pytest.mark.parametrize("payload", [f"{os.system.__module__}.system", "builtins.open"])
def test_a_pickle_that_runs_code_is_refused_without_side_effects(tmp_path, payload):
    def malicious(marker):
        if payload.endswith(".system"):
            return malicious_batch_bytes(os.system, f"touch '{marker}'")
        # builtins, but not a plain data type: the allowlist must not admit every builtin
        return b"cbuiltins\nopen\n(V" + str(marker).encode() + b"\nVw\ntR."

    control = tmp_path / "control-marker"  # proves the payload is real: plain pickle runs it
    pickle.loads(malicious(control))
    assert control.exists()

    marker = tmp_path / "marker"
    folder = write_cifar_folder(tmp_path / "raw")
    (folder / "data_batch_3").write_bytes(malicious(marker))
    refused = rf"refusing to unpickle .*data_batch_3: it asks for {payload}, so it is not a CIFAR-10 batch"
    with pytest.raises(DataError, match=refused):
        prepared.prepare(params_for(tmp_path))
    assert not marker.exists()
    assert not (tmp_path / "prepared").exists()


class _DtypeWithForgedState:
    """Pickles as numpy.dtype('u1') copied, with a state whose flags (63) say it holds Python object pointers."""

    def __reduce__(self):
        return np.dtype, ("u1", False, True), (3, "|", None, None, None, -1, -1, 63)


class _ArrayOfForgedDtype:
    def __reduce__(self):
        reconstruct = np.empty(0).__reduce__()[0]
        return reconstruct, (np.ndarray, (0,), b"b"), (1, (2, 3072), _DtypeWithForgedState(), False, b"A" * 6144)


def test_a_pickled_dtype_cannot_rewrite_numpys_internals():
    """Only allowed globals, yet a dtype copy that took the pickle's state would have numpy treat uint8 bytes as
    object pointers (numpy 2.4 crashed with SystemError; older ones may do worse): the batch gets numpy's own uint8."""
    batch = data._unpickle_batch(pickle.dumps({b"data": _ArrayOfForgedDtype(), b"labels": [0, 1]}, protocol=4),
                                 "data_batch_2")
    assert batch[b"data"].dtype is np.dtype("u1") and batch[b"data"].dtype.flags == 0
    assert not np.dtype("u1").hasobject


def _refused_within(limit_bytes: int, data_bytes: bytes, match: str) -> None:
    """Unpickling ``data_bytes`` is refused with a DataError matching ``match``, having allocated under the limit."""
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=match) as refused:
            data._unpickle_batch(data_bytes, "data_batch_1")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "\n" not in str(refused.value)
    assert peak < limit_bytes, f"allocated {peak} bytes before refusing"


RECONSTRUCT = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
HUGE = 200_000_000  # bytes; numpy reports its allocations to tracemalloc, so building it would show


@pytest.mark.parametrize("name, pickled", [
    ("bytes", b"\x80\x02cbuiltins\nbytes\nJ" + struct.pack("<i", HUGE) + b"\x85R."),
    ("bytearray", b"\x80\x02c__builtin__\nbytearray\nJ" + struct.pack("<i", HUGE) + b"\x85R."),
    ("numpy.ndarray", b"\x80\x02cnumpy\nndarray\nJ" + struct.pack("<i", HUGE) + b"\x85U\x02u1\x86R."),
    ("_reconstruct", b"\x80\x02" + RECONSTRUCT + b"J" + struct.pack("<i", HUGE) + b"\x85U\x02u1\x87R."),
    ("__setstate__", b"\x80\x02" + RECONSTRUCT + b"K\x00\x85U\x01b\x87R(K\x01J" + struct.pack("<i", HUGE)
     + b"\x85cnumpy\ndtype\nU\x02u1\x85R\x89U\x02ab\x74b."),
])
def test_a_tiny_pickle_cannot_build_a_huge_object(name, pickled):
    """Under 100 bytes of pickle asking for 200 MB: every constructor the unpickler allows is charged against one
    batch's worth of bytes before it runs."""
    assert len(pickled) < 100
    _refused_within(5_000_000, pickled, rf"refusing to unpickle data_batch_1: it builds .* bytes, more than the "
                                        rf"\d+ left of the {data.MAX_BATCH_BYTES} one batch may build")


def test_containers_and_strings_cannot_multiply_what_the_pickle_holds():
    """list() of a 1 MB byte string makes a million objects; str() of a list naming one 1 MB byte string 50 times
    renders it 50 times."""
    text = b"x" * 1_000_000
    _refused_within(10_000_000, pickle.dumps(_Calls(list, (text,)), protocol=4), r"it builds list\(b'xxx")
    _refused_within(10_000_000, pickle.dumps(_Calls(str, ([text] * 50,)), protocol=4),
                    "it converts a list to a scalar or string")


class _Calls:
    def __init__(self, function, args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def test_an_array_filled_again_and_again_from_one_string_is_charged_each_time():
    """numpy copies a str's latin-1 encoding into each array whose state it is: 8000 arrays naming one 4000-character
    string would build 32 MB from a 4 kB string, beyond the ~32 MB their opcodes are charged."""
    state = "a" * 4000

    class ArrayFromString:
        def __reduce__(self):
            return np.empty(0).__reduce__()[0], (np.ndarray, (0,), b"b"), (1, (len(state),), np.dtype("u1"), False,
                                                                          state)

    _refused_within(data.MAX_BATCH_BYTES, pickle.dumps([ArrayFromString() for _ in range(8000)], protocol=4),
                    r"it builds an array of shape \(4000,\) and uint8 of 4000 bytes, more than the")


ASTRAL = "\U0001f600"  # one character beyond the BMP: CPython then stores every character of the str in 4 bytes
NEAR_FULL = data.MAX_BATCH_BYTES - 100


@pytest.mark.parametrize("name, pickled", [
    ("BINUNICODE", b"\x80\x02X" + struct.pack("<I", NEAR_FULL) + (ASTRAL + "a" * (NEAR_FULL - 4)).encode() + b"."),
    ("BINUNICODE8", b"\x80\x04\x8d" + struct.pack("<Q", NEAR_FULL) + (ASTRAL + "a" * (NEAR_FULL - 4)).encode()
     + b"."),
    ("UNICODE", b"V" + ("\\U0001f600" + "a" * (NEAR_FULL - 10)).encode() + b"\n."),  # raw-unicode-escape
    ("GLOBAL", b"c" + b"a" * (NEAR_FULL - 10) + b"\nb\n."),  # module names are decoded as UTF-8 too
])
def test_a_long_str_is_refused_before_anything_decodes_it(name, pickled):
    """A batch's str values are file names and labels. A 40 MB str with one astral character would decode to 160 MB
    (twice, if the opcode scan decoded it as pickletools does): refused from its length, the scan decoding nothing."""
    assert len(pickled) <= data.MAX_BATCH_BYTES
    _refused_within(1_000_000, pickled, rf"it holds a str of \d+ bytes \({name}, opcode \d\), more than the "
                                        rf"{data.MAX_TEXT_BYTES} of a file name or label")


def test_objects_made_by_opcodes_alone_are_charged():
    """Three opcodes call _reconstruct again on the same memoized arguments: 60000 empty arrays, ~500 bytes each with
    their attribute dict, would take 30 MB that no constructor charges (their shape is empty), within the opcode
    limit. The scan charges each opcode, so the pickle is refused before anything is built."""
    call_again = b"h\x00h\x01R"  # BINGET _reconstruct, BINGET its arguments, REDUCE
    memoized = b"cnumpy.core.multiarray\n_reconstruct\nq\x00cnumpy\nndarray\nK\x00\x85U\x01b\x87q\x01"  # as 0 and 1
    pickled = b"\x80\x02" + memoized + b"(" + call_again * 60_000 + b"l."
    assert data.MAX_BATCH_OPCODES > 3 * 60_000
    _refused_within(1_000_000, pickled, r"it builds the object of opcode \d+ \(\w+\) of \d+ bytes, more than the")


@pytest.mark.parametrize("pickled, target", [
    (b"\x80\x02cnumpy\ndtype\nN}U\x0c__defaults__(U\x02f8\x88\x88ts\x86b.", "numpy.dtype"),
    (b"\x80\x02c__builtin__\nlist\nN}U\x04spam\x88s\x86b.", "list"),
])
def test_a_pickle_cannot_set_attributes_of_the_constructors_it_calls(pickled, target):
    """BUILD on a plain function sets its attributes: numpy.dtype's defaults would change for the whole process."""
    defaults = data._builtin_dtype.__defaults__
    with pytest.raises(DataError, match=rf"it sets the state of {target}, so it is not a CIFAR-10 batch"):
        data._unpickle_batch(pickled, "data_batch_1")
    assert data._builtin_dtype.__defaults__ == defaults


@pytest.mark.parametrize("pickled, match", [
    (b"\x80\x04\x8e" + struct.pack("<Q", HUGE) + b"x.", "cannot be read .*expected 200000000 bytes"),  # BINBYTES8
    (b"\x80\x02Nr" + struct.pack("<I", 25_000_000) + b".",  # LONG_BINPUT
     "it stores at memo index 25000000 after only 3 opcodes"),
    (b"\x80\x04" + b"}" * (data.MAX_BATCH_OPCODES + 1) + b".", "it holds more than 200000 opcodes"),
])
def test_what_pythons_unpickler_allocates_before_reading_is_refused_first(pickled, match):
    """A length prefix is allocated before the bytes it announces are read, and a memo index grows the memo table to
    it (8 bytes an entry: 10 bytes of pickle asked for 400 MB); so each is checked against the data first."""
    _refused_within(10_000_000, pickled, match)


def test_an_oversized_archive_member_is_refused_from_its_header(tmp_path):
    """The member's declared size is checked before its bytes are read: this one declares 1 GB and holds none."""
    member = tarfile.TarInfo(f"{data.BATCH_FOLDER}/data_batch_1")
    member.size = 1_000_000_000
    (tmp_path / data.ARCHIVE_NAME).write_bytes(gzip.compress(member.tobuf()))
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=rf"refusing to unpickle .*data_batch_1: it is 1000000000 bytes, more "
                                            rf"than the {data.MAX_BATCH_BYTES} of one CIFAR-10 batch"):
            data.load_source(data.find_source(tmp_path))
        assert tracemalloc.get_traced_memory()[1] < 5_000_000
    finally:
        tracemalloc.stop()


def test_an_oversized_batch_file_is_refused_from_its_size(tmp_path):
    folder = write_cifar_folder(tmp_path)
    with open(folder / "data_batch_2", "r+b") as f:
        f.truncate(data.MAX_BATCH_BYTES + 1)  # sparse: nothing written
    with pytest.raises(DataError, match=rf"data_batch_2: it is {data.MAX_BATCH_BYTES + 1} bytes, more than"):
        data.load_source(data.find_source(tmp_path))


def test_a_full_size_official_batch_fits_the_limits():
    """10000 images, as in every official batch file, with their labels and file names: read as before, building
    little beyond the 30.72 MB of images (their bytes are the array's buffer, and the pickle is read without
    copies)."""
    arrays = make_cifar_arrays(n_train_per_batch=2000, n_test=1)
    pickled = cifar_batch_bytes(arrays["x_train"], arrays["y_train"], "training batch 1 of 5")
    tracemalloc.start()
    try:
        batch = data._unpickle_batch(pickled, "data_batch_1")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 30_720_000 + 2_000_000, f"allocated {peak} bytes"
    images, labels = data._parse_batch(batch, "data_batch_1")
    assert type(images) is np.ndarray and images.shape == (10000, *data.IMAGE_SHAPE)
    assert np.array_equal(images, arrays["x_train"]) and np.array_equal(labels, arrays["y_train"])
    assert data.MAX_BATCH_BYTES > len(pickled) > 30_720_000


def test_a_full_size_batch_re_pickled_by_python_3_fits_the_limits():
    """The same with every name a str (as Python 3 reads the official batches with encoding='latin1') as long as the
    official ones (leptodactylus_pentadactylus_s_000004.png), pickled with protocol 4."""
    arrays = make_cifar_arrays(n_train_per_batch=2000, n_test=1)
    rows = arrays["x_train"].transpose(0, 3, 1, 2).reshape(10000, -1)
    pickled = pickle.dumps({"batch_label": "training batch 1 of 5", "labels": arrays["y_train"].tolist(), "data": rows,
                            "filenames": [f"leptodactylus_pentadactylus_s_{i:06d}.png" for i in range(10000)]},
                           protocol=4)
    images, labels = data._parse_batch(data._unpickle_batch(pickled, "data_batch_1"), "data_batch_1")
    assert np.array_equal(images, arrays["x_train"]) and np.array_equal(labels, arrays["y_train"])


def test_a_prepare_killed_midway_leaves_no_manifest_over_a_mixed_split(tmp_path, monkeypatch):
    write_cifar_npz(tmp_path / "raw", N_PER_BATCH, N_TEST)
    prepared.prepare(params_for(tmp_path))
    save = prepared.save_npy

    def killed_at_the_validation_images(path, array):
        if path.name.startswith("val_x"):
            raise KeyboardInterrupt
        save(path, array)

    monkeypatch.setattr(data, "save_npy", killed_at_the_validation_images)
    with pytest.raises(KeyboardInterrupt):  # another split: train_x is rewritten before the kill, val_x is not
        prepared.prepare(params_for(tmp_path, seed=1))
    with pytest.raises(DataError, match="run `ddim-denoise prepare`"):
        prepared.load_split(tmp_path / "prepared", "val")


def test_truncated_archive_is_reported_as_such(tmp_path):
    archive = write_cifar_tar(tmp_path)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match=f"{archive}: cannot be read .*truncated or corrupt"):
        data.load_source(data.find_source(tmp_path))


@pytest.mark.parametrize("kind", ["tar", "folder"])
def test_missing_batch_is_named(tmp_path, kind):
    WRITERS[kind](tmp_path, omit=["data_batch_5"])
    with pytest.raises(DataError, match="missing data_batch_5;"):
        data.load_source(data.find_source(tmp_path))


def test_garbage_batch_is_reported_with_its_path(tmp_path):
    folder = write_cifar_folder(tmp_path)
    (folder / "test_batch").write_bytes(b"\x80\x02}q\x00")  # a pickle cut off mid-way
    with pytest.raises(DataError, match="test_batch: cannot be read"):
        data.load_source(data.find_source(tmp_path))


ARRAYS = make_cifar_arrays()


@pytest.mark.parametrize("replace, message", [
    ({"x_train": ARRAYS["x_train"][:, :16]}, r"shape \(N, 32, 32, 3\)"),
    ({"x_test": ARRAYS["x_test"].transpose(0, 3, 1, 2)}, r"shape \(N, 32, 32, 3\)"),
    ({"x_train": ARRAYS["x_train"].astype(np.float32)}, "must be uint8"),
    ({"y_train": ARRAYS["y_train"] + 10}, r"labels must lie in 0\.\.9"),
    ({"y_test": ARRAYS["y_test"][:-1]}, "expected 4 labels"),
    ({"y_test": ARRAYS["y_test"].astype(np.float64)}, "labels must be integers"),
    ({"x_test": ARRAYS["x_test"][:0], "y_test": ARRAYS["y_test"][:0]}, "holds no images"),
])
def test_bad_npz_arrays_are_refused(tmp_path, replace, message):
    write_cifar_npz(tmp_path, **replace)
    with pytest.raises(DataError, match=message):
        data.load_source(data.find_source(tmp_path))


def test_npz_missing_keys_or_not_an_npz(tmp_path):
    np.savez(tmp_path / "cifar10.npz", x_train=ARRAYS["x_train"])
    with pytest.raises(DataError, match="missing y_train, x_test, y_test"):
        data.load_source(data.find_source(tmp_path))
    (tmp_path / "cifar10.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(DataError, match="cifar10.npz: cannot be read"):
        data.load_source(data.find_source(tmp_path))


@pytest.mark.parametrize("download, reason", [(False, "data.download is false"),
                                              (True, "download failed .*network is unreachable")])
def test_no_data_gives_one_line_saying_where_to_put_it(tmp_path, monkeypatch, download, reason):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=reason) as error:
        data.fetch_data("data/raw", download=download)
    message = str(error.value)
    assert "\n" not in message and "in data/raw/" in message
    assert all(name in message for name in (data.ARCHIVE_NAME, data.BATCH_FOLDER, ".npz"))


def test_fetch_data_downloads_when_allowed(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_download_official", lambda raw_dir: write_cifar_tar(raw_dir))
    assert data.fetch_data(tmp_path / "raw", download=True) == (
        f"CIFAR-10 official archive at {tmp_path / 'raw' / data.ARCHIVE_NAME}")


def write_params_file(tmp_path) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"data": {"raw_dir": str(tmp_path / "raw"), "download": False,
                                             "prepared_dir": str(tmp_path / "prepared"), "val_size": VAL_SIZE}}))
    return str(path)


def test_cli_prepare_and_fetch_data(tmp_path):
    write_cifar_npz(tmp_path / "raw", N_PER_BATCH, N_TEST)
    params = write_params_file(tmp_path)
    runner = CliRunner()
    fetched = runner.invoke(app, ["fetch-data", "--params", params])
    assert fetched.exit_code == 0 and "npz arrays at" in fetched.stdout
    prepared = runner.invoke(app, ["prepare", "-p", params, "-S", "seed=3"])
    assert prepared.exit_code == 0, prepared.output
    assert f"train {N_TRAIN - VAL_SIZE}, val {VAL_SIZE}, test {N_TEST} images" in prepared.stdout
    assert json.loads((tmp_path / "prepared" / MANIFEST_FILE).read_text())["seed"] == 3


def test_cli_prepare_on_bad_input_exits_2_with_one_line(tmp_path):
    write_cifar_npz(tmp_path / "raw", y_train=ARRAYS["y_train"] + 10)
    result = CliRunner().invoke(app, ["prepare", "--params", write_params_file(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and "labels" in result.stderr
