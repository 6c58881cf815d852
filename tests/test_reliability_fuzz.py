"""Fuzzing with hypothesis: the parse rule, the label readers and the image loader raise nothing but
our own error types, whatever bytes they are given."""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from qponder_mlx.images import ImageError, load_image
from qponder_mlx.labels import KNOWN_FORMATS, LabelError, Sample, read_labels
from qponder_mlx.prompts import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    SCORE_MAX,
    SCORE_MIN,
    THINK_CLOSE,
    THINK_OPEN,
    parse_response,
)

# QPONDER_FUZZ_EXAMPLES=5000 for a long hunt; the default keeps the file at a few seconds.
FUZZ = settings(max_examples=int(os.environ.get("QPONDER_FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# --------------------------------------------------------------------------------------------
# parse_response

TAGS = [THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE, "<think", "answer>", "</ans"]
NUMBERS = ["3.72", "1", "5", "5.00", "0.99", "5.01", ".5", "4.", "1e3", "nan", "inf", "-2",
           "٣", "３", "3,5", "+3"]
PIECES = st.one_of(st.sampled_from(TAGS), st.sampled_from(NUMBERS),
                   st.sampled_from([" ", "\n", "\t", "\x00", "\u2028", "é", "🙂"]),
                   st.text(max_size=12))
REPLIES = st.lists(PIECES, max_size=24).map("".join)

# The parse rule as first written with regexes (the oracle for the linear-time rewrite).
_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


@FUZZ
@given(REPLIES)
def test_parse_response_never_raises_and_keeps_its_invariants(text):
    p = parse_response(text)
    assert p.score is None or SCORE_MIN <= p.score <= SCORE_MAX
    if p.format_ok:
        assert p.score is not None and p.reasoning is not None
        assert [text.count(t) for t in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)] \
            == [1, 1, 1, 1]
    think, answers = _THINK_RE.search(text), _ANSWER_RE.findall(text)
    assert p.reasoning == (think.group(1).strip() if think else None)
    if p.score is not None:
        assert float(answers[-1]) == p.score


@pytest.mark.parametrize("text", [
    THINK_OPEN * 150_000, ANSWER_OPEN * 150_000,
    f"{THINK_OPEN}a{THINK_CLOSE}" + ANSWER_OPEN * 150_000, THINK_OPEN + THINK_CLOSE * 150_000,
    f"{THINK_OPEN}{THINK_CLOSE}{ANSWER_OPEN}" + " " * 1_000_000 + f"3{ANSWER_CLOSE}"],
    ids=["think", "answer", "unclosed-answers", "closes", "spaces"])
def test_parse_response_is_linear_on_megabyte_replies(text):
    # A teacher server may send anything; the regex version took 35 s on 112 kB of "<think>".
    t0 = time.perf_counter()
    parse_response(text)
    assert time.perf_counter() - t0 < 1.0


# --------------------------------------------------------------------------------------------
# label readers

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                         st.text(max_size=20), st.sampled_from(["good.png", "../x.png", "/etc",
                                                                "", " ", "nan", "3.5", "1e999"]))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=6)
ROW = st.fixed_dictionaries({}, optional={"image": JSON_VALUES, "mos": JSON_VALUES,
                                          "id": JSON_VALUES, "mos_std": JSON_VALUES,
                                          "gt_score": JSON_VALUES, "std": JSON_VALUES})
CELL = st.one_of(st.sampled_from(["good.png", "3.5", "", "nan", "-1", '"', ",", ";", "\t",
                                  "\r\n", "\n", "é", "\x00"]), st.text(max_size=8))
SUFFIXES = [".jsonl", ".json", ".csv", ".tsv", ".txt", ".xlsx"]
FORMATS = ["auto", *KNOWN_FORMATS]


def _read(name: str, data: bytes, fmt: str, check_images: bool):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(root / "good.png")
        path = root / name
        path.write_bytes(data)
        try:
            samples, problems = read_labels(path, format=fmt, check_images=check_images)
        except LabelError as e:
            assert e.problems and "\n" not in str(e.problems[0])
            return
        for s in samples:
            assert isinstance(s, Sample) and SCALE_OK(s.mos) and s.id
            assert not check_images or s.image.is_file()
        for p in problems:
            assert str(p).strip() and "\n" not in str(p), p


def SCALE_OK(x: float) -> bool:  # noqa: N802 — reads as a predicate in the asserts above
    return 1.0 - 1e-9 <= x <= 5.0 + 1e-9


@FUZZ
@given(data=st.binary(max_size=400), suffix=st.sampled_from(SUFFIXES),
       fmt=st.sampled_from(FORMATS), check=st.booleans())
def test_label_readers_on_random_bytes(data, suffix, fmt, check):
    _read("labels" + suffix, data, fmt, check)


@FUZZ
@given(rows=st.lists(st.one_of(ROW, JSON_VALUES), max_size=6), as_list=st.booleans(),
       check=st.booleans())
# Found by this fuzzer: a key or an image name with a line break made a two-line problem.
@example(rows=[{"\n": None}], as_list=False, check=False)
@example(rows=[{"image": "a\u2028b.png", "mos": 3}], as_list=True, check=True)
def test_label_readers_on_random_json(rows, as_list, check):
    if as_list:
        _read("meta.json", json.dumps(rows).encode(), "auto", check)
    else:
        body = "\n".join(json.dumps(r) for r in rows)
        _read("labels.jsonl", body.encode("utf-8", "surrogatepass"), "auto", check)


@FUZZ
@given(header=st.lists(st.sampled_from(["image", "mos", "MOS", "image_name", "dist_img", "dmos",
                                        "var", "name", "mos_quality", "Image name", "sd", ""]),
                       min_size=1, max_size=4),
       rows=st.lists(st.lists(CELL, max_size=5), max_size=6),
       sep=st.sampled_from([",", ";", "\t"]), bom=st.booleans(), crlf=st.booleans(),
       name=st.sampled_from(["labels.csv", "koniq10k.csv", "dmos.csv", "data.csv"]),
       check=st.booleans())
def test_label_readers_on_random_tables(header, rows, sep, bom, crlf, name, check):
    eol = "\r\n" if crlf else "\n"
    text = eol.join(sep.join(r) for r in [header, *rows]) + eol
    data = (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8", "surrogatepass")
    _read(name, data, "auto", check)


# --------------------------------------------------------------------------------------------
# images: bytes of real files with random damage


def _encoded(fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    mode = {"JPEG": "RGB", "PNG": "RGBA", "GIF": "P", "WEBP": "RGB", "TIFF": "I;16",
            "BMP": "RGB"}[fmt]
    Image.new(mode, (24, 16), 7).save(buf, format=fmt, **kw)
    return buf.getvalue()


SEEDS = {fmt: _encoded(fmt) for fmt in ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP")}


@st.composite
def damaged(draw) -> tuple[str, bytes]:
    fmt = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[fmt])
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[i:i + draw(st.integers(1, 64))]
        else:
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
    return fmt, bytes(data)


@FUZZ
@given(damaged())
@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on the metadata we broke
def test_load_image_raises_only_image_error(case):
    fmt, data = case
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"x.{fmt.lower()}"
        path.write_bytes(data)
        try:
            img = load_image(path)
        except ImageError as e:
            assert "\n" not in str(e) and str(e).startswith(f"{path}: ")
        else:
            assert img.mode == "RGB" and img.width > 0 and img.height > 0
