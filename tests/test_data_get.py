"""`qponder data get`: against a stand-in Hub on 127.0.0.1 serving small archives in the real
layouts (pyiqa's koniq10k.tgz tree, its meta-info CSV header, DeQA-Score's metas), offline."""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import huggingface_hub.constants as hf_constants
import pytest
from fake_hub import FakeHub
from PIL import Image
from qponder_mlx.cli.main import app
from typer.testing import CliRunner

from qponder_mlx.iqa_sets import DataError, Limits, UnsafeArchive, find_set, get_set, safe_extract
from qponder_mlx.iqa_sets.fetch import download_archive
from qponder_mlx.labels import list_splits, load_labels

META = "chaofengc/IQA-PyTorch-Datasets-metainfo"
ARCH = "chaofengc/IQA-PyTorch-Datasets"
DEQA = "zhiyuanyou/Data-DeQA-Score"
SMALL = ["--min-pixels", str(56 * 56), "--max-pixels", str(112 * 112)]

# Rows of pyiqa's meta_info_KonIQ10kDataset.csv (github.com/chaofengc/IQA-PyTorch,
# pyiqa/data/meta_info/), header and values as published; 8 of its 10,073 rows.
KONIQ_HEADER = "img_name,mos,std,split,c1,c2,c3,c4,c5,c_total"
KONIQ_ROWS = [
    "10004473376.jpg,77.3836206897,0.527277894494,training,0.0,0.0,0.238095238095,"
    "0.695238095238,0.0666666666667,105",
    "10007357496.jpg,68.7285714286,0.580003024795,test,0.0,0.03125,0.46875,0.489583333333,"
    "0.0104166666667,96",
    "10007903636.jpg,78.6285714286,0.527219618675,training,0.0104166666667,0.0,0.208333333333,"
    "0.760416666667,0.0208333333333,96",
    "10009096245.jpg,77.24375,0.556217750099,training,0.0,0.0,0.192660550459,0.688073394495,"
    "0.119266055046,109",
    "100117038.jpg,75.1125,0.532859638122,training,0.0,0.01,0.21,0.72,0.06,100",
    "10020766793.jpg,81.50625,0.529297934147,test,0.0,0.0,0.100917431193,0.715596330275,"
    "0.183486238532,109",
    "10020891105.jpg,56.8297413793,0.445865843302,test,0.0,0.0392156862745,0.78431372549,"
    "0.176470588235,0.0,102",
    "10043785683.jpg,71.2043269231,0.497974333332,validation,0.0,0.0,0.433962264151,"
    "0.566037735849,0.0,106",
]
NAMES = [r.split(",")[0] for r in KONIQ_ROWS]


def jpeg(i: int, size=(32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (20 * i % 256, 90, 200 - 10 * i)).save(buf, "JPEG")
    return buf.getvalue()


def tgz(members: dict[str, bytes], links: dict[str, tuple[str, bool]] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, (target, hard) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
    return buf.getvalue()


def koniq_files() -> dict[tuple[str, str], bytes]:
    members = {}
    for i, n in enumerate(NAMES):
        members[f"koniq10k/512x384/{n}"] = jpeg(i)
        members[f"koniq10k/1024x768/{n}"] = jpeg(i, (64, 48))
    csv = (KONIQ_HEADER + "\n" + "\n".join(KONIQ_ROWS) + "\n").encode()
    return {(ARCH, "koniq10k.tgz"): tgz(members), (META, "meta_info_KonIQ10kDataset.csv"): csv}


@pytest.fixture
def online(monkeypatch):
    # conftest.py sets HF_HUB_OFFLINE=1 for the suite; these tests talk to 127.0.0.1 only.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)


def quiet(_msg: str) -> None:
    pass


def get(hub, out, tmp_path, name="koniq10k", **kw):
    return get_set(name, out, endpoint=hub.endpoint, cache_dir=tmp_path / "hf-cache", say=quiet,
                   progress=False, **kw)


# ---------------------------------------------------------------- get -> eval, then a no-op


def test_get_lays_out_splits_and_eval_runs_on_it(online, tmp_path, tiny_model_dir):
    out = tmp_path / "datasets"
    with FakeHub(koniq_files()) as hub:
        p = get(hub, out, tmp_path)
    # pyiqa's layout, the archive gone, the splits as their own files
    assert Path(p.images_root) == out / "koniq10k" / "512x384"
    assert p.other_roots == [str(out / "koniq10k" / "1024x768")]
    assert not (out / ".qponder-data" / "koniq10k.tgz").exists()
    assert (p.n_eval, p.n_train) == (3, 4)
    test_csv = Path(p.eval_labels)
    assert test_csv.name == "meta_info_KonIQ10kDataset.test.csv"
    assert test_csv.read_text().splitlines()[0] == KONIQ_HEADER
    s = {x.id: x for x in load_labels(test_csv, images_root=p.images_root)}
    assert set(s) == {"10007357496.jpg", "10020766793.jpg", "10020891105.jpg"}
    # KonIQ's pyiqa `mos` is on 0-100: 68.73 -> 1 + 4 * 0.6873; its 1-5 SD is not rescaled
    assert s["10007357496.jpg"].mos == pytest.approx(1 + 4 * 68.7285714286 / 100)
    assert s["10007357496.jpg"].mos_std is None

    eval_cmd, distill_cmd = p.commands(find_set("koniq10k"))
    assert distill_cmd.startswith(f"qponder distill --data {p.train_labels} ")
    args = shlex.split(eval_cmd)[1:]
    args[args.index("--out") + 1] = str(tmp_path / "report.json")
    res = CliRunner().invoke(app, [*args, "--model", str(tiny_model_dir), "--mode", "fast",
                                   *SMALL])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["n_labels"] == rep["n_scored"] == 3


def test_second_get_does_nothing(online, tmp_path):
    out = tmp_path / "datasets"
    with FakeHub(koniq_files()) as hub:
        first = get(hub, out, tmp_path)
        before = len(hub.requests)
        again = get(hub, out, tmp_path)
        assert len(hub.requests) == before  # no HEAD, no GET
    assert again.already and not first.already
    assert again.eval_labels == first.eval_labels and again.n_eval == first.n_eval


def test_cli_get_honours_hf_endpoint_and_says_nothing_to_do(tmp_path):
    out = tmp_path / "datasets"
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    with FakeHub(koniq_files()) as hub:
        env["HF_ENDPOINT"] = hub.endpoint
        cmd = [sys.executable, "-m", "qponder_mlx.cli.main", "data", "get", "koniq", "--out",
               str(out)]
        first = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert first.returncode == 0, first.stderr
    assert "3 labelled images to evaluate on, 4 to train on" in first.stdout
    assert "qponder eval --data " in first.stdout and "qponder distill --data " in first.stdout
    assert "research use" in first.stderr  # the terms, before anything is fetched
    assert second.returncode == 0 and "nothing to do" in second.stdout


# ---------------------------------------------------------------- resume and cache


def test_interrupted_download_resumes_where_it_stopped(online, tmp_path):
    out = tmp_path / "datasets"
    files = koniq_files()
    size = len(files[(ARCH, "koniq10k.tgz")])
    with FakeHub(files) as hub:
        hub.cut_after["koniq10k.tgz"] = size // 2
        with pytest.raises(DataError) as exc:
            get(hub, out, tmp_path)
        msg = str(exc.value)
        assert "\n" not in msg and msg.count("rerun the same command to resume") == 1
        assert msg.endswith(f"(kept {size // 2} B in {out}/.qponder-data/koniq10k.tgz.part) — "
                            "rerun the same command to resume")
        part = out / ".qponder-data" / "koniq10k.tgz.part"
        assert part.stat().st_size == size // 2
        assert not (out / "koniq10k").exists()
        p = get(hub, out, tmp_path)
        assert hub.gets("koniq10k.tgz") == [None, f"bytes={size // 2}-"]
    assert p.n_eval == 3 and not part.exists()


def test_prepopulated_cache_works_offline(online, tmp_path, monkeypatch):
    from huggingface_hub import hf_hub_download

    cache = tmp_path / "hf-cache"
    with FakeHub(koniq_files()) as hub:
        for repo, f in ((ARCH, "koniq10k.tgz"), (META, "meta_info_KonIQ10kDataset.csv")):
            hf_hub_download(repo, f, repo_type="dataset", endpoint=hub.endpoint, cache_dir=cache)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    p = get_set("koniq10k", tmp_path / "d", cache_dir=cache, say=quiet, progress=False)
    assert p.n_eval == 3
    assert next(cache.rglob("*koniq10k.tgz")).exists()  # the cache's copy is never deleted


# ---------------------------------------------------------------- one-line errors


def test_offline_without_cache_is_one_line(tmp_path):
    assert hf_constants.is_offline_mode()  # conftest.py
    with pytest.raises(DataError) as exc:
        get_set("koniq10k", tmp_path / "d", cache_dir=tmp_path / "c", say=quiet, progress=False)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("offline (HF_HUB_OFFLINE is set)")
    assert "meta_info_KonIQ10kDataset.csv" in msg


def test_not_found_unreachable_and_disk_full_are_one_line(online, tmp_path):
    with FakeHub(koniq_files()) as hub:
        with pytest.raises(DataError, match=r"^not found on http://127\.0\.0\.1:\d+: "
                                            r"chaofengc/IQA-PyTorch-Datasets/nope\.tgz"):
            download_archive(ARCH, "nope.tgz", tmp_path / "x", endpoint=hub.endpoint)
        with pytest.raises(DataError, match="the repository of someone/else"):
            download_archive("someone/else", "a.tgz", tmp_path / "x", endpoint=hub.endpoint)
        with pytest.raises(DataError) as exc:
            download_archive(ARCH, "koniq10k.tgz", tmp_path / "x", endpoint=hub.endpoint,
                             free_bytes=lambda _p: 1000, need_after=10**9)
        assert str(exc.value).startswith(f"disk full: {tmp_path} has 1 kB free")
        dead = hub.endpoint
    with pytest.raises(DataError) as exc:
        download_archive(ARCH, "koniq10k.tgz", tmp_path / "x", endpoint=dead)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"cannot reach {dead}")
    # the whole `get` too, at once: huggingface_hub's own retries (24 s) are not waited for
    with pytest.raises(DataError, match=f"^cannot reach {dead}"):
        get_set("koniq10k", tmp_path / "d", endpoint=dead, cache_dir=tmp_path / "c",
                say=quiet, progress=False)


def test_hf_token_is_sent_and_disk_full_while_writing_is_one_line(online, tmp_path,
                                                                   monkeypatch):
    import errno

    from qponder_mlx.iqa_sets.fetch import explain

    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_the_test")
    with FakeHub(koniq_files()) as hub:
        download_archive(ARCH, "koniq10k.tgz", tmp_path / "k.tgz", endpoint=hub.endpoint)
    assert set(hub.authorization) == {"Bearer hf_fake_token_for_the_test"}
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "k.tgz.part"))
    msg = str(explain(full, f"{ARCH}/koniq10k.tgz"))
    assert msg.startswith(f"disk full while writing {ARCH}/koniq10k.tgz") and "rerun" in msg


def test_unknown_set_is_one_line(tmp_path):
    res = CliRunner().invoke(app, ["data", "get", "tid2013", "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert "unknown data set 'tid2013' — one of: koniq10k, spaq, kadid10k, livec, agiqa3k" \
        in res.output


def test_list_shows_sizes_resolutions_sources_and_terms():
    res = CliRunner().invoke(app, ["data", "list"])
    assert res.exit_code == 0, res.output
    out = res.output
    for name in ("koniq10k", "spaq", "kadid10k", "livec", "agiqa3k"):
        assert f"\n{name} " in "\n" + out
    assert "10,073 images, 6.35 GB download, resolution 512x384, 1024x768" in out
    assert "hf://datasets/chaofengc/IQA-PyTorch-Datasets/spaq.tgz" in out
    assert "non-commercial research and education use" in out and out.count("terms:") == 5


# ---------------------------------------------------------------- DeQA metas, other layout


def test_agiqa3k_from_a_zip_and_deqa_metas(online, tmp_path):
    names = ["AttnGAN_normal_000.jpg", "midjourney_lowstep_101.jpg", "sd1.5_normal_020.jpg"]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:  # a layout the catalogue does not know
        for i, n in enumerate(names):
            zf.writestr(f"AGIQA-3K/pics/{n}", jpeg(i))
    # DeQA-Score's meta shape (build_soft_labels/gen_soft_label.py), gt_score the raw 0-5 MOS
    meta = [{"id": f"{n}->{m}", "image": f"AGIQA3K/images/{n}", "gt_score": m,
             "gt_score_norm": 1 + m, "std": 0.5, "std_norm": 0.4}
            for n, m in zip(names, (0.4, 2.5, 4.1))]
    files = {(ARCH, "AGIQA-3K.zip"): buf.getvalue(),
             (DEQA, "AGIQA3K/metas/test_agiqa_3k.json"): json.dumps(meta).encode()}
    out = tmp_path / "datasets"
    with FakeHub(files) as hub:
        p = get(hub, out, tmp_path, name="agiqa3k")
    # an archive tree we could not read goes whole into the set's own folder
    assert Path(p.images_root) == out / "AGIQA-3K" / "AGIQA-3K" / "pics"
    assert p.train_labels is None and p.n_eval == 3
    assert p.eval_labels == str(out / "AGIQA3K" / "metas" / "test_agiqa_3k.json")
    eval_cmd, distill_cmd = p.commands(find_set("agiqa3k"))
    assert "--mos-range 0,5" in eval_cmd and "no train split" in distill_cmd
    s = load_labels(p.eval_labels, images_root=p.images_root, mos_range=(0, 5))
    assert [round(x.mos, 6) for x in s] == [1.32, 3.0, 4.28]  # 1 + 4 * m / 5


# ---------------------------------------------------------------- unsafe archives


def _tar_file(tmp_path, members, links=None) -> Path:
    path = tmp_path / "evil.tgz"
    path.write_bytes(tgz(members, links))
    return path


EVIL = {
    "dotdot": ({"koniq10k/../../escaped.txt": b"x"}, None, "'..' in the path"),
    "absolute": ({"/tmp/qponder-absolute-escape.txt": b"x"}, None, "absolute path"),
    # the link first, then a file written through it: the link is refused before that
    "symlink_out": ({"koniq10k/link/owned.txt": b"pwned"},
                    {"koniq10k/link": ("../../outside", False)}, "leaves the target"),
    "symlink_abs": ({}, {"koniq10k/link": ("/etc/passwd", False)}, "link to an absolute"),
    "hardlink_out": ({}, {"koniq10k/hl": ("../outside/secret", True)}, "leaves the target"),
    "bomb_bytes": ({"koniq10k/zeros.bin": b"\0" * (8 << 20)}, None, "ceiling (archive bomb?)"),
    "bomb_files": ({f"koniq10k/{i}.jpg": b"" for i in range(40)}, None, "more than 30 members"),
}


@pytest.mark.parametrize("case", list(EVIL))
def test_unsafe_tar_members_are_refused(tmp_path, case):
    members, links, why = EVIL[case]
    arch = tmp_path / "evil.tgz"
    arch.write_bytes(_link_then_file(links or {}, members))
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "box" / "unpack"
    with pytest.raises(UnsafeArchive) as exc:
        safe_extract(arch, target, Limits(max_bytes=1 << 20, max_files=30))
    msg = str(exc.value)
    assert "\n" not in msg and why in msg and msg.startswith("evil.tgz: refused member")
    assert not target.exists()  # nothing half-written
    assert list(outside.iterdir()) == [] and not (tmp_path / "escaped.txt").exists()
    assert not Path("/tmp/qponder-absolute-escape.txt").exists()


def _link_then_file(links, members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, (target, hard) in links.items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_unsafe_zip_member_is_refused(tmp_path):
    arch = tmp_path / "evil.zip"
    with zipfile.ZipFile(arch, "w") as zf:
        zf.writestr("AGIQA-3K/ok.jpg", b"fine")
        zf.writestr("../../escaped.jpg", b"x")
    with pytest.raises(UnsafeArchive, match="'..' in the path"):
        safe_extract(arch, tmp_path / "t", Limits(1 << 20, 10))
    assert not (tmp_path / "t").exists() and not (tmp_path.parent / "escaped.jpg").exists()


def test_internal_links_are_kept(tmp_path):
    arch = _tar_file(tmp_path, {"a/img.jpg": b"jpg"}, {"a/same.jpg": ("img.jpg", False),
                                                       "a/copy.jpg": ("a/img.jpg", True)})
    got = safe_extract(arch, tmp_path / "t", Limits(1 << 20, 10))
    assert got.top_level == ("a",) and got.files == 3
    assert (tmp_path / "t/a/same.jpg").read_bytes() == (tmp_path / "t/a/copy.jpg").read_bytes()


def test_get_refuses_an_unsafe_archive_and_writes_nothing_outside(online, tmp_path):
    files = koniq_files()
    files[(ARCH, "koniq10k.tgz")] = tgz({"koniq10k/512x384/a.jpg": jpeg(0),
                                         "../../escaped.jpg": b"x"})
    out = tmp_path / "box" / "datasets"
    with FakeHub(files) as hub, pytest.raises(UnsafeArchive) as exc:
        get(hub, out, tmp_path)
    assert "\n" not in str(exc.value)
    assert sorted(p.name for p in (tmp_path / "box").iterdir()) == ["datasets"]
    assert not (tmp_path / "escaped.jpg").exists()
    assert not (out / "koniq10k").exists()
    assert not (out / ".qponder-data" / "koniq10k.tgz").exists()  # refused: not kept


def test_catalogue_entries_are_consistent():
    for s in (find_set(n) for n in ("koniq", "kadid", "clive", "agiqa", "spaq")):
        assert s is not None and s.images > 0 and s.download_bytes > 0
        assert s.label_format in ("pyiqa", "deqa") and s.terms
    assert replace(find_set("koniq10k"), images=1).member_ceiling == 1004
    assert list_splits(Path(__file__)) == {}
