"""`bundle verify` refuses what would crash a loader after an "OK": links, folders in place of
files, and safetensors headers that lie about their size."""

import json
import re
import shutil
import struct

import pytest
from qponder_mlx.export.bundle import export_bundle
from qponder_mlx.export.config import ExportConfig
from qponder_mlx.export.manifest import MANIFEST, sha256_file, write_manifest
from qponder_mlx.export.safetensors_header import HeaderError, read_header
from qponder_mlx.export.verify import verify_bundle


@pytest.fixture(scope="module")
def bundle(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vf") / "b"
    return export_bundle(ExportConfig(model=str(tiny_model_dir), out=str(out), agreement=False,
                                      target="python", min_pixels=56 * 56,
                                      max_pixels=112 * 112), progress=False).out


@pytest.fixture
def copy_of(bundle, tmp_path):
    folder = tmp_path / "b"
    shutil.copytree(bundle, folder)
    return folder


def _reseal(folder, rel):
    m = json.loads((folder / MANIFEST).read_text())
    m["files"][rel] = {"sha256": sha256_file(folder / rel), "size": (folder / rel).stat().st_size}
    write_manifest(folder, m)


def test_a_symlinked_weight_file_is_refused(copy_of, tmp_path):
    real = tmp_path / "elsewhere.safetensors"
    shutil.move(copy_of / "model.safetensors", real)
    (copy_of / "model.safetensors").symlink_to(real)  # same bytes, same checksum
    (problem,) = verify_bundle(copy_of).problems
    assert "model.safetensors: a symbolic link, not a plain file" in problem


def test_a_folder_in_place_of_a_weight_file_is_refused(copy_of):
    (copy_of / "model.safetensors").unlink()
    (copy_of / "model.safetensors").mkdir()
    (problem,) = verify_bundle(copy_of).problems
    assert "model.safetensors: a folder, not a plain file" in problem


def test_a_symlinked_subfolder_is_refused(copy_of, tmp_path):
    shutil.move(copy_of / "golden", tmp_path / "g")
    (copy_of / "golden").symlink_to(tmp_path / "g")
    problems = verify_bundle(copy_of).problems
    assert problems and all("a symbolic link" in p for p in problems)


def _with_header(path, header_len: int, header: bytes, data: bytes = b""):
    path.write_bytes(struct.pack("<Q", header_len) + header + data)


def test_a_2_62_header_length_is_refused_before_any_load(copy_of):
    w = copy_of / "model.safetensors"
    raw = w.read_bytes()
    w.write_bytes(struct.pack("<Q", 1 << 62) + raw[8:])  # same size, crafted length
    _reseal(copy_of, "model.safetensors")
    (problem,) = verify_bundle(copy_of).problems
    assert f"header length {1 << 62} exceeds the file" in problem


@pytest.mark.parametrize("header, data, says", [
    (b"{not json", b"", "not valid UTF-8 JSON"),
    (b"[1, 2]", b"", "not a JSON object"),
    (json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode(),
     b"\0" * 8, "outside the 8-byte data section"),
    (json.dumps({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}).encode(),
     b"\0" * 16, "16 bytes for shape [3] of F32"),
    (json.dumps({"w": {"dtype": "F33", "shape": [4], "data_offsets": [0, 16]}}).encode(),
     b"\0" * 16, "unknown dtype 'F33'"),
])
def test_bad_headers_are_one_line_errors(tmp_path, header, data, says):
    f = tmp_path / "x.safetensors"
    _with_header(f, len(header), header, data)
    with pytest.raises(HeaderError, match=re.escape(says)) as e:
        read_header(f)
    assert "\n" not in str(e.value)


def test_a_good_header_reads_like_safetensors(bundle):
    from safetensors import safe_open

    header = read_header(bundle / "model.safetensors")
    with safe_open(str(bundle / "model.safetensors"), "np") as f:
        names = f.keys()
        assert sorted(header) == sorted(names)
        for k in names:
            assert header[k]["shape"] == list(f.get_slice(k).get_shape())
