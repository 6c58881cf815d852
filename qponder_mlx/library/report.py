"""The gallery report: one self-contained HTML file, a view of the store.

Everything is inside the file: thumbnails as base64 JPEG data URLs, the histogram as inline SVG,
styles and the filter/sort script inline. A Content-Security-Policy allows only that exact script
and style (by hash) and data: images, so the file fetches nothing and, even if some text escaped
the escaping, no injected script could run. All text from files and models is HTML-escaped.

Thumbnails are made once per photo content and cached in the store (`thumbs` table), so
re-exporting a report for a large library is quick.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import os
import re
import time
import urllib.parse
from collections.abc import Sequence

from PIL import Image, ImageOps

from qponder_mlx.images import ensure_heif_support, load_image
from qponder_mlx.io import atomic_write_text
from qponder_mlx.library.store import UNREADABLE_PREFIX, ResultStore
from qponder_mlx.progress import progress_bar

THUMB_SIZE = 192  # longest side in px: ~10–15 KB a photo in the page (base64 included)
HIST_LO, HIST_HI, HIST_BINS = 1.0, 5.0, 16  # bins 0.25 wide over the score range

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def esc(value) -> str:
    """HTML-escape any value (quotes too, so it is safe in attributes); control chars -> U+FFFD."""
    return html.escape(_CONTROL.sub("\ufffd", "" if value is None else str(value)), quote=True)


# ------------------------------------------------------------------------------ thumbnails


def make_thumbnail(path: str | os.PathLike, size: int = THUMB_SIZE) -> bytes | None:
    """A JPEG thumbnail (longest side `size`), upright and RGB; None if the file can't be read."""
    ensure_heif_support()
    try:
        with Image.open(path) as im:
            if im.format == "JPEG":
                # JPEG can decode at 1/2..1/8 scale: a 24 Mpx photo thumbnails ~10x faster.
                im.draft("RGB", (size, size))
                try:
                    img = ImageOps.exif_transpose(im)
                except Exception:  # noqa: BLE001 — broken EXIF: keep the unrotated pixels
                    img = im
                img = img.convert("RGB")
            else:
                img = None
        if img is None:
            img = load_image(path)  # every other format: the scorer's own robust loader
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=75, optimize=True)
        return buf.getvalue()
    except Exception:  # noqa: BLE001 — a missing thumbnail must never stop a report
        return None


def ensure_thumbs(store: ResultStore, rows: Sequence[dict], size: int = THUMB_SIZE,
                  progress: bool = True) -> dict[str, bytes | None]:
    """sha256 -> thumbnail for the rows, making (and caching in the store) the missing ones."""
    keys = {r["sha256"]: r["path"] for r in rows
            if not r["error"] and not r["sha256"].startswith(UNREADABLE_PREFIX)}
    have = store.thumbs(keys, size)
    missing = [k for k in keys if k not in have]
    made: list[tuple[str, bytes | None]] = []
    with progress_bar(len(missing), "thumbnails", enabled=progress) as advance:
        for k in missing:
            made.append((k, make_thumbnail(keys[k], size)))
            advance()
            if len(made) >= 256:  # committed in chunks: an interrupted report keeps its work
                with store.transaction():
                    store.put_thumbs(made, size)
                have.update(made)
                made = []
    if made:
        with store.transaction():
            store.put_thumbs(made, size)
        have.update(made)
    return have


# ------------------------------------------------------------------------------ histogram


def histogram(scores: Sequence[float], bins: int = HIST_BINS, lo: float = HIST_LO,
              hi: float = HIST_HI) -> list[int]:
    """Counts in `bins` equal bins over [lo, hi]; the last bin includes hi (as numpy's does)."""
    counts = [0] * bins
    width = (hi - lo) / bins
    for s in scores:
        if lo <= s <= hi:
            counts[min(int((s - lo) / width), bins - 1)] += 1
    return counts


def histogram_svg(scores: Sequence[float], width: int = 640, height: int = 170) -> str:
    counts = histogram(scores)
    top = max(counts) or 1
    pad_l, pad_b, pad_t = 30, 24, 8
    plot_w, plot_h = width - pad_l - 8, height - pad_b - pad_t
    bw = plot_w / len(counts)
    step = (HIST_HI - HIST_LO) / len(counts)
    parts = [f'<svg id="histogram" xmlns="http://www.w3.org/2000/svg" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="Histogram of {len(scores)} scores">']
    for i, n in enumerate(counts):
        h = plot_h * n / top
        a, b = HIST_LO + i * step, HIST_LO + (i + 1) * step
        parts.append(
            f'<rect class="bar" data-lo="{a:.2f}" data-hi="{b:.2f}" data-count="{n}" '
            f'x="{pad_l + i * bw + 1:.1f}" y="{pad_t + plot_h - h:.1f}" width="{bw - 2:.1f}" '
            f'height="{h:.1f}" fill="#4a7bd0"><title>{a:.2f}–{b:.2f}: {n}</title></rect>')
    base = pad_t + plot_h
    parts.append(f'<line x1="{pad_l}" y1="{base}" x2="{pad_l + plot_w}" y2="{base}" '
                 'stroke="#555"/>')
    for v in range(int(HIST_LO), int(HIST_HI) + 1):
        x = pad_l + (v - HIST_LO) / (HIST_HI - HIST_LO) * plot_w
        parts.append(f'<text x="{x:.1f}" y="{height - 6}" font-size="12" '
                     f'text-anchor="middle" fill="#333">{v}</text>')
    parts.append(f'<text x="4" y="{pad_t + 10}" font-size="11" fill="#333">{top}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ------------------------------------------------------------------------------ page

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 24px 40px;color:#222;background:#fafafa}
h1{font-size:22px;margin:18px 0 4px}.meta{color:#555;margin:0 0 12px}
.controls{position:sticky;top:0;background:#fafafa;padding:8px 0;z-index:1;
display:flex;gap:12px;flex-wrap:wrap;align-items:center;border-bottom:1px solid #ddd}
.controls input[type=number]{width:5em}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:14px;
margin-top:14px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;margin:0}
.card img,.noimg{display:block;max-width:100%;height:auto;margin:0 auto 6px}
.noimg{width:100%;height:120px;background:#eee;color:#888;text-align:center;line-height:120px}
.score{font-size:20px;font-weight:600;margin-right:6px}.name{word-break:break-all}
.dir{color:#777;font-size:12px;word-break:break-all}
.reasoning{white-space:pre-wrap;font-size:13px;color:#333;max-height:12em;overflow:auto}
.raw{white-space:pre-wrap;font-size:12px;color:#555}
.explained{border-top:1px solid #ddd;margin-top:6px;padding-top:4px}.rscore{font-weight:600}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}
[hidden]{display:none!important}
"""

SCRIPT = """
(function () {
  var grid = document.getElementById('grid');
  var cards = Array.prototype.slice.call(grid.children);
  var q = document.getElementById('q'), lo = document.getElementById('min');
  var hi = document.getElementById('max'), sort = document.getElementById('sort');
  var shown = document.getElementById('shown');
  var text = cards.map(function (c) { return c.textContent.toLowerCase(); });
  function score(c) { var s = c.getAttribute('data-score'); return s === '' ? null : +s; }
  function byName(a, b) {
    var x = a.getAttribute('data-name'), y = b.getAttribute('data-name');
    return x < y ? -1 : x > y ? 1 : 0;
  }
  function byScore(dir) {
    return function (a, b) {
      var x = score(a), y = score(b);
      if (x === null || y === null) { return (x === null) - (y === null) || byName(a, b); }
      return (x - y) * dir || byName(a, b);
    };
  }
  var orders = {'score-desc': byScore(-1), 'score-asc': byScore(1), 'name': byName};
  function apply() {
    var needle = q.value.trim().toLowerCase(), min = parseFloat(lo.value);
    var max = parseFloat(hi.value), n = 0;
    cards.forEach(function (c, i) {
      var s = score(c), ok = !needle || text[i].indexOf(needle) >= 0;
      if (!isNaN(min)) { ok = ok && s !== null && s >= min; }
      if (!isNaN(max)) { ok = ok && s !== null && s <= max; }
      c.hidden = !ok; if (ok) { n++; }
    });
    cards.slice().sort(orders[sort.value] || orders['score-desc'])
      .forEach(function (c) { grid.appendChild(c); });
    shown.textContent = n + ' of ' + cards.length + ' shown';
    var p = new URLSearchParams();
    if (needle) { p.set('q', q.value.trim()); }
    if (!isNaN(min)) { p.set('min', lo.value); }
    if (!isNaN(max)) { p.set('max', hi.value); }
    if (sort.value !== 'score-desc') { p.set('sort', sort.value); }
    var h = p.toString();
    if (('#' + h) !== location.hash && (h || location.hash)) {
      try { history.replaceState(null, '', h ? '#' + h : location.pathname); } catch (e) {}
    }
  }
  // The URL fragment holds the view (#sort=name&min=3&q=dog), so a filtered view can be shared.
  var init = new URLSearchParams(location.hash.slice(1));
  if (init.has('q')) { q.value = init.get('q'); }
  if (init.has('min')) { lo.value = init.get('min'); }
  if (init.has('max')) { hi.value = init.get('max'); }
  if (init.has('sort') && orders[init.get('sort')]) { sort.value = init.get('sort'); }
  [q, lo, hi, sort].forEach(function (el) { el.addEventListener('input', apply); });
  sort.addEventListener('change', apply);
  apply();
  document.body.setAttribute('data-js', 'ready');
})();
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def sort_rows(rows: Sequence[dict]) -> list[dict]:
    """Best first; answers without a score last; ties by file name then path (the page's order)."""
    def key(r):
        return (r["score"] is None, -(r["score"] or 0.0), os.path.basename(r["path"]), r["path"])
    return sorted(rows, key=key)


def file_url(path: str) -> str:
    """`file:` URL of an absolute path (RFC 8089), every byte outside [A-Za-z0-9_.-~/]
    percent-encoded (a name that is not UTF-8 keeps its own bytes)."""
    return "file://" + urllib.parse.quote(os.fsencode(path), safe="/")


def _card(r: dict, thumb: bytes | None) -> str:
    name = os.path.basename(r["path"])
    score = r["score"]
    if thumb:
        with Image.open(io.BytesIO(thumb)) as im:
            w, h = im.size
        img = (f'<img src="data:image/jpeg;base64,{base64.b64encode(thumb).decode()}" '
               f'width="{w}" height="{h}" alt="{esc(name)}">')
        # The thumbnail opens the photo itself (a file: URL, percent-encoded, so no character
        # of the name can end the attribute or change the scheme).
        img = f'<a class="orig" href="{esc(file_url(r["path"]))}">{img}</a>'
    else:
        img = '<div class="noimg">no preview</div>'
    body = ""
    if r.get("reasoning"):
        body = f'<p class="reasoning">{esc(r["reasoning"])}</p>'
    body += _explained(r.get("explained"))
    if score is None:
        body += ('<details><summary>no valid score in the answer</summary>'
                 f'<p class="raw">{esc(r.get("text") or "")}</p></details>')
    shown = "—" if score is None else f"{score:.2f}"
    return (f'<figure class="card" data-score="{"" if score is None else f"{score:.4f}"}" '
            f'data-name="{esc(name.lower())}" data-path="{esc(r["path"])}">{img}'
            f'<figcaption><span class="score">{shown}</span><span class="name">{esc(name)}'
            f'</span><div class="dir">{esc(os.path.dirname(r["path"]))}</div>{body}'
            '</figcaption></figure>')


def _explained(x: dict | None) -> str:
    """A fast-mode card's reason-mode result (`--explain`), when the photo was picked."""
    if not x:
        return ""
    if x["error"]:
        return f'<div class="explained">reasoning failed: {esc(x["error"])}</div>'
    score = "—" if x["score"] is None else f"{x['score']:.2f}"
    text = x.get("reasoning") or x.get("text") or ""
    return (f'<div class="explained"><span class="rscore">reasoning score {score}</span>'
            f'<p class="reasoning">{esc(text)}</p></div>')


def render_report(rows: Sequence[dict], thumbs: dict[str, bytes | None], *,
                  title: str = "qponder scores", pending: int = 0) -> str:
    """The report page for store rows (see ResultStore.rows); thumbs: sha256 -> JPEG bytes."""
    ok = sort_rows([r for r in rows if not r["error"]])
    failed = sorted((r for r in rows if r["error"]), key=lambda r: r["path"])
    scores = [r["score"] for r in ok if r["score"] is not None]
    first = rows[0] if rows else {}
    meta = [f"{len(rows)} files", f"{len(scores)} scored", f"{len(failed)} failed"]
    if len(ok) > len(scores):
        meta.append(f"{len(ok) - len(scores)} without a valid score")
    n_explained = sum(1 for r in ok if r.get("explained"))
    if n_explained:
        meta.append(f"{n_explained} explained in reason mode")
    if pending:
        meta.append(f"{pending} not scored yet")
    if scores:
        meta.append(f"mean {sum(scores) / len(scores):.2f}")
    model = first.get("model", "")
    if first.get("adapter"):
        model += f" + {first['adapter']}"
    about = (f"model {model} · mode {first.get('mode', '')} · prompt "
             f"{first.get('prompt_version', '')} · generated {time.strftime('%Y-%m-%d %H:%M')}")
    csp = (f"default-src 'none'; img-src data:; style-src {_csp_hash(STYLE)}; "
           f"script-src {_csp_hash(SCRIPT)}")
    cards = "\n".join(_card(r, thumbs.get(r["sha256"])) for r in ok)
    fail_rows = "\n".join(f'<tr><td class="path">{esc(r["path"])}</td>'
                          f'<td class="reason">{esc(r["error"])}</td></tr>' for r in failed)
    failures = (f'<table><tr><th>file</th><th>reason</th></tr>{fail_rows}</table>' if failed
                else "<p>None.</p>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{esc(csp)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{esc(title)}</h1>
<p class="meta" id="counts">{esc(" · ".join(meta))}</p>
<p class="meta">{esc(about)}</p>
{histogram_svg(scores) if scores else ""}
<div class="controls">
<label>search <input id="q" type="search" placeholder="name, folder or reasoning"></label>
<label>min <input id="min" type="number" min="1" max="5" step="0.1"></label>
<label>max <input id="max" type="number" min="1" max="5" step="0.1"></label>
<label>sort <select id="sort"><option value="score-desc">score, best first</option>
<option value="score-asc">score, worst first</option><option value="name">name</option>
</select></label>
<span id="shown">{len(ok)} of {len(ok)} shown</span>
</div>
<div id="grid">
{cards}
</div>
<h2 id="failures-title">Failures ({len(failed)})</h2>
<section id="failures">{failures}</section>
<script>{SCRIPT}</script>
</body></html>
"""


def write_report(store: ResultStore, rows: Sequence[dict], path: str | os.PathLike, *,
                 title: str = "qponder scores", pending: int = 0, thumb_size: int = THUMB_SIZE,
                 progress: bool = True) -> None:
    thumbs = ensure_thumbs(store, rows, thumb_size, progress=progress)
    atomic_write_text(path, render_report(rows, thumbs, title=title, pending=pending))
