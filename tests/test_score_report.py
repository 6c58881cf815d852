"""The HTML gallery: escaping, order, histogram, thumbnails; rendered in real headless Chromium."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from qponder_mlx.library import ResultStore, write_report
from qponder_mlx.library import report as rep
from qponder_mlx.library.store import FileState

EVIL = '<script>document.title="pwned"</script><img src=x onerror="document.title=1">'
IDENTITY = "w123:reason:qponder-v1"


def photo(path, seed, size=(120, 80), exif_rotate=False, fmt=None):
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 3)) * 255).astype("uint8")
    arr[: size[1] // 4] = (220, 40, 40)  # a red top band: shows which way is up
    img = Image.fromarray(arr)
    kw = {}
    if exif_rotate:
        exif = Image.Exif()
        exif[0x0112] = 6
        kw["exif"] = exif
    img.save(path, fmt, **kw)
    return path


def result_row(path, score, *, reasoning="Sharp, well exposed.", error=None, sha=None):
    return {"sha256": sha or hashlib.sha256(str(path).encode()).hexdigest(),
            "identity": IDENTITY, "path": str(path), "score": score, "reasoning": reasoning,
            "text": f"<think>{reasoning}</think><answer>{score}</answer>", "format_ok": 1,
            "error": error, "error_kind": "image" if error else None, "mode": "reason",
            "model": "tiny", "adapter": None, "weights": "w123", "prompt_version": "qponder-v1",
            "seconds": 0.1, "tokens": 10, "scored_at": 0.0}


def populate(store, tmp_path):
    """A store with six photos (one reasoning is hostile HTML), one unscored answer, 2 failures."""
    scores = {"alpha.jpg": 2.5, "bravo.jpg": 4.75, "charlie.png": 1.0, "delta.jpg": 3.33,
              "echo.jpg": 5.0, "fox&<b>.jpg": 3.9}
    rows = []
    for i, (name, s) in enumerate(scores.items()):
        p = photo(tmp_path / name, i, exif_rotate=name == "delta.jpg")
        rows.append(result_row(p, s, reasoning=EVIL if name == "alpha.jpg" else f"Photo {i}."))
    rows.append(result_row(photo(tmp_path / "golf.jpg", 9), None, reasoning=None))
    rows.append(result_row(tmp_path / "broken.jpg", None, reasoning=None,
                           error='truncated or corrupt image (<b>bad</b>) — re-export it'))
    rows.append(result_row(tmp_path / "empty.png", None, reasoning=None,
                           error="empty file (0 bytes) — re-export or remove it"))
    with store.transaction():
        store.put_results(rows)
        store.put_files((r["path"], FileState(r["sha256"], 1, 1)) for r in rows)
    return scores


# ----------------------------------------------------------------------------- pure functions


def test_histogram_matches_numpy():
    rng = np.random.default_rng(0)
    scores = [*rng.uniform(1, 5, 500), 1.0, 5.0, 1.25, 3.0, 4.75]
    ref, _ = np.histogram(scores, bins=rep.HIST_BINS, range=(rep.HIST_LO, rep.HIST_HI))
    assert rep.histogram(scores) == ref.tolist()
    assert sum(rep.histogram(scores)) == len(scores)


def test_escaping_covers_text_attributes_and_control_characters():
    assert rep.esc('<a href="x">\'&') == "&lt;a href=&quot;x&quot;&gt;&#x27;&amp;"
    assert rep.esc("a\x00b\x1bc\nd") == "a\ufffdb\ufffdc\nd"


def test_page_is_sorted_escaped_and_locked_down(tmp_path):
    with ResultStore(tmp_path / "r.sqlite") as store:
        scores = populate(store, tmp_path)
        rows = store.rows(IDENTITY)
        page = rep.render_report(rows, rep.ensure_thumbs(store, rows, progress=False))
    cards = re.findall(r'<figure class="card" data-score="([^"]*)"', page)
    expected = sorted(scores.values(), reverse=True)
    assert [float(c) for c in cards[:-1]] == expected and cards[-1] == ""  # unscored last
    # Hostile text appears only escaped: one <script> element on the page, ours.
    assert page.count("<script") == 1 and "&lt;script&gt;document.title" in page
    assert "fox&amp;&lt;b&gt;.jpg" in page and "(&lt;b&gt;bad&lt;/b&gt;)" in page
    # The CSP allows exactly the inline script and style (by hash) and data: images.
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1)
    for block in ("script", "style"):
        body = re.search(rf"<{block}>(.*?)</{block}>", page, re.S).group(1)
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"sha256-{digest}" in csp
    assert "default-src &#x27;none&#x27;" in csp and "img-src data:" in csp
    # Every photo embedded (six scored, one unscored answer); nothing else is loaded.
    assert re.findall(r'<img src="([a-z]+):', page) == ["data"] * 7
    assert page.count('<tr><td class="path">') == 2


def test_thumbnails_are_upright_small_and_cached(tmp_path, monkeypatch):
    p = photo(tmp_path / "rot.jpg", 1, size=(400, 200), exif_rotate=True)
    thumb = Image.open(io.BytesIO(rep.make_thumbnail(p, 96)))
    assert thumb.format == "JPEG" and thumb.size == (48, 96)  # rotated to portrait
    r, g, b = thumb.getpixel((thumb.width - 3, thumb.height // 2))  # band is now on the right
    assert r > 150 and g < 100
    cmyk = tmp_path / "cmyk.jpg"
    Image.open(p).convert("CMYK").save(cmyk)
    assert Image.open(io.BytesIO(rep.make_thumbnail(cmyk, 64))).mode == "RGB"
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((60, 120), 40000, dtype=np.uint16)).save(deep)
    assert Image.open(io.BytesIO(rep.make_thumbnail(deep, 64))).size == (64, 32)
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    assert rep.make_thumbnail(tmp_path / "bad.jpg") is None

    with ResultStore(tmp_path / "r.sqlite") as store:
        rows = [result_row(p, 3.0)]
        first = rep.ensure_thumbs(store, rows, 64, progress=False)
        monkeypatch.setattr(rep, "make_thumbnail", lambda *a: pytest.fail("not cached"))
        assert rep.ensure_thumbs(store, rows, 64, progress=False) == first


# ----------------------------------------------------------------------------- real Chromium


def chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium not installed (apt-get install chromium; .ci/run installs it)")
    return exe


def browse(tmp_path, url, *args):
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp_path / 'chrome-profile'}", *args, url]
    # The browser must not inherit the OpenBLAS preload meant for MLX (scripts/blas_env.sh):
    # Chromium's GPU process refuses to start with it.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


@pytest.fixture(scope="module")
def report_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    with ResultStore(tmp / "r.sqlite") as store:
        scores = populate(store, tmp)
        write_report(store, store.rows(IDENTITY), tmp / "report.html", title="My photos",
                     progress=False)
    return tmp / "report.html", scores


def cards_in(dom):
    """(score, name, hidden) of each card, in document order, from Chromium's DOM."""
    out = []
    for m in re.finditer(r'<figure class="card"([^>]*)>', dom):
        attrs = m.group(1)
        score = re.search(r'data-score="([^"]*)"', attrs).group(1)
        name = re.search(r'data-name="([^"]*)"', attrs).group(1)
        out.append((float(score) if score else None, name, " hidden" in attrs))
    return out


def test_chromium_renders_photos_in_score_order_and_runs_no_injected_script(report_file,
                                                                            tmp_path):
    path, scores = report_file
    dom = browse(tmp_path, path.as_uri(), "--dump-dom")
    assert 'data-js="ready"' in dom  # our script ran (CSP allowed it)...
    assert "<title>My photos</title>" in dom and "pwned" not in dom.split("<body")[0]  # not theirs
    assert "&lt;script&gt;document.title=\"pwned\"&lt;/script&gt;" in dom  # shown as text
    cards = cards_in(dom)
    assert [c[0] for c in cards] == [*sorted(scores.values(), reverse=True), None]
    assert not any(hidden for *_, hidden in cards)
    assert dom.count('src="data:image/jpeg;base64,') == len(scores) + 1
    bars = re.findall(r'<rect class="bar"[^>]*data-count="(\d+)"', dom)
    assert [int(b) for b in bars] == rep.histogram(list(scores.values()))
    heights = [float(h) for h in re.findall(r'<rect class="bar"[^>]*height="([\d.]+)"', dom)]
    tallest = max(heights)
    assert tallest > 50
    for h, n in zip(heights, bars):
        assert h == pytest.approx(tallest * int(n) / max(map(int, bars)), abs=0.2)
    assert 'id="shown">7 of 7 shown' in dom
    assert dom.count('<td class="path">') == 2 and "Failures (2)" in dom


def test_chromium_sort_and_filter_controls(report_file, tmp_path):
    path, scores = report_file
    dom = browse(tmp_path, path.as_uri() + "#sort=score-asc&min=2&max=4.8", "--dump-dom")
    cards = cards_in(dom)
    visible = [s for s, _, hidden in cards if not hidden]
    assert visible == sorted(s for s in scores.values() if 2 <= s <= 4.8)
    assert [s for s, *_ in cards] == [*sorted(scores.values()), None]
    assert 'id="shown">4 of 7 shown' in dom
    dom = browse(tmp_path, path.as_uri() + "#sort=name&q=photo%204", "--dump-dom")
    cards = cards_in(dom)
    assert [n for _, n, _ in cards] == sorted(n for _, n, _ in cards)
    assert [n for _, n, hidden in cards if not hidden] == ["echo.jpg"]  # "Photo 4." reasoning


def test_chromium_screenshot_is_not_blank(report_file, tmp_path):
    path, _ = report_file
    png = tmp_path / "shot.png"
    browse(tmp_path, path.as_uri(), f"--screenshot={png}", "--window-size=1200,900",
           "--hide-scrollbars")
    assert png.exists()
    shot = np.asarray(Image.open(png).convert("RGB"))
    assert shot.shape[:2] == (900, 1200)
    assert shot.std() > 20 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 500
    # The histogram's blue bars are on screen.
    blue = (shot[..., 2] > 180) & (shot[..., 0] < 110) & (shot[..., 1] > 100)
    assert blue.sum() > 500
