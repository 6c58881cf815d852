"""Security promises: API keys only from the environment and never in a file, log or exception
text; no pickle / remote code / eval / exec in our source; label paths stay under their root
(tests/test_reliability_inputs.py); the HTML report renders every string as text.

Bundle tampering (a changed byte, a missing file, an edited manifest, an extra weight file, and
`eval --bundle` on a tampered copy) is refused: tests/test_export.py covers it
(test_flipped_byte_in_weights_is_refused, test_missing_file_is_refused,
test_edited_manifest_is_refused, test_extra_weight_file_is_refused,
test_eval_accepts_a_bundle_and_refuses_a_tampered_one).
"""

from __future__ import annotations

import ast
import csv
import json
import random
import re
import sqlite3
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest
from distill_server import write_index_image
from qponder_mlx.cli.main import app
from reliability.corpus import good_image
from reliability.proxy import FaultProxy
from typer.testing import CliRunner

from qponder_mlx.distill import DistillConfig, TeacherError
from qponder_mlx.distill.config import build_teacher, read_api_key
from qponder_mlx.labels import Sample

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("qponder_mlx", "cli", "export")
SMALL = ["--min-pixels", "3136", "--max-pixels", "12544"]


def cli(*args, env: dict | None = None) -> tuple[int, str]:
    res = CliRunner().invoke(app, [str(a) for a in args], env=env)
    return res.exit_code, res.output  # stdout and stderr, interleaved (click 8.2+)


# --------------------------------------------------------------------------------------------
# The source: no pickle, no remote code, no eval/exec

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal",
                  "shelve", "torch"}
UNSAFE_CALLS = {"eval", "exec", "__import__"}
UNSAFE_KEYWORDS = {"trust_remote_code", "allow_pickle"}


def unsafe_constructs(source: str, name: str = "<src>") -> list[str]:
    """Every import of a pickling module (or torch, whose load unpickles), call of a builtin
    eval/exec, and `trust_remote_code=True` / `allow_pickle=True` (as a keyword or a dict key).
    Attribute calls such as `mx.eval(...)` or `model.eval()` are MLX's, not Python's eval."""
    found = []
    for node in ast.walk(ast.parse(source, name)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names
                      if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module and \
                node.module.split(".")[0] in UNSAFE_MODULES:
            found.append(f"{where} from {node.module} import")
        elif isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id in UNSAFE_CALLS:
                found.append(f"{where} {node.func.id}()")
            found += [f"{where} {k.arg}=True" for k in node.keywords
                      if k.arg in UNSAFE_KEYWORDS and not _is_false(k.value)]
        elif isinstance(node, ast.Dict):
            found += [f"{where} {{{k.value!r}: ...}}" for k, v in zip(node.keys, node.values)
                      if isinstance(k, ast.Constant) and k.value in UNSAFE_KEYWORDS
                      and not _is_false(v)]
    return found


def _is_false(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value in (False, None)


def test_the_scanner_finds_what_it_looks_for():
    planted = ("import pickle\nfrom torch import load\nimport dill as d\neval('1')\nexec('x=1')\n"
               "AutoModel.from_pretrained(p, trust_remote_code=True)\n"
               "np.load(f, allow_pickle=True)\ncfg = {'trust_remote_code': True}\n"
               "mx.eval(x)\nmodel.eval()\nload_config(p, trust_remote_code=False)\n")
    found = unsafe_constructs(planted)
    assert len(found) == 8, found  # the last three lines are fine


def test_our_source_has_no_pickle_remote_code_eval_or_exec():
    files = [p for d in SOURCE_DIRS for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 30
    found = [f for p in files for f in unsafe_constructs(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == []
    # and we never save anything as a pickle: weights and state are safetensors and JSON
    suffixes = {p.suffix for d in SOURCE_DIRS for p in (ROOT / d).rglob("*") if p.is_file()}
    assert not suffixes & {".pkl", ".pickle", ".pt", ".pth", ".bin", ".npy", ".npz"}


# --------------------------------------------------------------------------------------------
# API keys: from the environment only, never shown


@pytest.fixture
def secret() -> str:
    return f"sk-live-{random.getrandbits(96):024x}"  # fresh: finding it means we leaked it


def test_no_flag_or_config_key_takes_a_key_value(tmp_path, secret):
    code, help_text = cli("distill", "--help")
    assert code == 0 and "--api-key-env" in help_text
    flags = {w.strip(",") for w in help_text.split() if w.startswith("--")}
    secretish = re.compile(r"-(api-key|key|token|secret|password|auth|bearer)(-|$)")
    assert {f for f in flags if secretish.search(f)} == {"--api-key-env"}
    assert [f for f in DistillConfig.__dataclass_fields__ if "key" in f] == ["api_key_env"]

    toml = tmp_path / "d.toml"
    toml.write_text(f'[distill]\napi_key = "{secret}"\n')
    code, log = cli("distill", "--data", "x.jsonl", "--out", tmp_path / "o.jsonl",
                    "--config", toml)
    assert code == 2 and "unknown key 'api_key'" in log and secret not in log


@pytest.mark.parametrize("where", ["flag", "toml"])
def test_a_key_pasted_as_the_variable_name_is_never_echoed(tmp_path, secret, where):
    labels = tmp_path / "l.jsonl"
    good_image(tmp_path / "a.png")
    labels.write_text('{"image": "a.png", "mos": 3}\n')
    args = ["distill", "--data", labels, "--out", tmp_path / "o.jsonl", "--teacher-url",
            "http://127.0.0.1:9/v1", "--teacher-model", "m"]
    if where == "flag":
        args += ["--api-key-env", secret]
    else:
        (tmp_path / "d.toml").write_text(f'api_key_env = "{secret}"\n')
        args += ["--config", tmp_path / "d.toml"]
    code, log = cli(*args, env={})
    assert code == 2 and "api_key_env" in log
    assert secret not in log and secret[8:20] not in log
    with pytest.raises(ValueError) as e:
        read_api_key(secret, environ={})
    assert secret not in str(e.value)
    # a real variable name is still named, so the user knows what to export
    with pytest.raises(ValueError, match="QPONDER_UNSET_KEY_VAR is not set"):
        read_api_key("QPONDER_UNSET_KEY_VAR", environ={})


def test_a_server_echoing_the_key_in_its_error_body_gets_it_scrubbed(tmp_path, secret):
    """A leaky server puts the Authorization header in its 500 body; our error text, rows,
    summary and output must show `Bearer ***`, never the key."""
    data = tmp_path / "data"
    data.mkdir()
    write_index_image(data / "img_00.png", 0)
    (data / "l.jsonl").write_text('{"image": "img_00.png", "mos": 3.0, "id": "s00"}\n')
    out = tmp_path / "out" / "d.jsonl"
    with FaultProxy("http://127.0.0.1:9", rate=1.0, faults=("http_500",)) as proxy:
        code, log = cli("distill", "--data", data / "l.jsonl", "--out", out, "--teacher-url",
                        proxy.url, "--teacher-model", "m", "--api-key-env", "QP_SEC_KEY",
                        "--max-retries", 0, env={"QP_SEC_KEY": secret})
        # the same through the Python API: the exception text is scrubbed too
        teacher = build_teacher(DistillConfig(teacher_url=proxy.url, teacher_model="m",
                                              api_key_env="QP_SEC_KEY"),
                                environ={"QP_SEC_KEY": secret})
        sample = Sample("s00", data / "img_00.png", 3.0)
        with pytest.raises(TeacherError) as e:
            teacher.ask(teacher.prepare(sample), sample, _Prompt())
        teacher.close()
    assert code == 0, log
    (row,) = [json.loads(x) for x in out.with_name("d.rejected.jsonl").read_text().splitlines()]
    assert row["code"] == "http_500" and "Bearer ***" in row["reason"]
    assert "Bearer ***" in str(e.value) and secret not in str(e.value) + repr(teacher)
    assert secret not in log
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert secret.encode() not in p.read_bytes(), p


class _Prompt:
    system, user, version = "s", "u", "v"


# --------------------------------------------------------------------------------------------
# The HTML report renders all text as text


_FILE_URL = re.compile(r"file:///[A-Za-z0-9_.~/%-]*")


class _Audit(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: Counter = Counter()
        self.scripts: list[str] = []
        self.problems: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags[tag] += 1
        self._in_script = tag == "script"
        if tag == "script":
            self.scripts.append("")
        for k, v in attrs:
            if k.startswith("on"):
                self.problems.append(f"<{tag} {k}=...>")
            # The thumbnails' data: images, and each card's link to its photo: a file: URL
            # with every character that could mean something percent-encoded.
            if k in ("src", "href", "action", "formaction") and not (
                    (v or "").startswith("data:image/jpeg;base64,")
                    or (tag, k) == ("a", "href") and _FILE_URL.fullmatch(v or "")):
                self.problems.append(f"<{tag} {k}={v!r}>")

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data


PAYLOADS = {
    "reasoning": '<script>alert("reasoning")</script><img src=x onerror=alert(1)>',
    "text": "</p></details><script>alert(2)</script>",
    "error": "<script>alert(3)</script> — re-export it",
}
FILE_NAMES = ["<svg onload=alert(4)>.png", '"><img src=x onerror=alert(5)>.png']
# The only tags the report itself writes; an injected one shows up as a new tag.
REPORT_TAGS = {"a", "html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "svg",
               "rect", "line", "text", "div", "label", "input", "select", "option", "span",
               "figure", "img", "figcaption", "details", "summary", "section", "table", "tr",
               "th", "td", "script"}


def audit_report(page: str) -> _Audit:
    from qponder_mlx.library.report import SCRIPT

    a = _Audit()
    a.feed(page)
    assert a.problems == []
    assert set(a.tags) <= REPORT_TAGS, set(a.tags) - REPORT_TAGS
    assert a.scripts == [SCRIPT]  # one script: ours, unchanged
    return a


def test_score_report_escapes_file_names_reasoning_text_and_errors(tiny_model_dir, tmp_path):
    lib = tmp_path / "lib"
    for i, name in enumerate(FILE_NAMES):
        good_image(lib / name, seed=50 + i)
    (lib / "<b>broken.jpg").write_bytes(b"\xff\xd8 broken")
    db, report, out_csv = tmp_path / "r.sqlite", tmp_path / "r.html", tmp_path / "r.csv"
    args = ["score", lib, "--model", tiny_model_dir, "--mode", "reason", "--max-tokens", 6,
            *SMALL, "--db", db, "--no-progress"]
    code, log = cli(*args)
    assert code == 0, log
    # What a model (or a crafted file) could put in the store: markup everywhere.
    con = sqlite3.connect(db)
    with con:
        con.execute("UPDATE results SET reasoning=?, text=? WHERE error IS NULL",
                    (PAYLOADS["reasoning"], PAYLOADS["text"]))
        con.execute("UPDATE results SET reasoning='=HYPERLINK(\"http://x\")' WHERE path LIKE "
                    "'%svg%'")
        con.execute("UPDATE results SET error=? WHERE error IS NOT NULL", (PAYLOADS["error"],))
    con.close()
    code, log = cli(*args, "--report", report, "--csv", out_csv)  # every row cached
    assert code == 0, log
    page = report.read_text()
    audit_report(page)
    assert page.count("&lt;script&gt;alert(&quot;reasoning&quot;)&lt;/script&gt;") >= 1
    assert "&lt;script&gt;alert(3)&lt;/script&gt;" in page
    assert "&lt;svg onload=alert(4)&gt;.png" in page
    # the CSV view neutralises a formula in a cell
    rows = list(csv.DictReader(out_csv.open()))
    (svg,) = [r for r in rows if "svg" in r["path"]]
    assert svg["reasoning"].startswith("'=")


def test_render_report_api_escapes_every_field():
    from qponder_mlx.library.report import render_report

    base = {"score": 3.2, "format_ok": True, "model": "<script>m</script>", "adapter": None,
            "mode": "reason", "prompt_version": "<b>v</b>"}
    rows = [{**base, "sha256": "a", "path": f"/x/{FILE_NAMES[0]}", "reasoning":
             PAYLOADS["reasoning"], "text": PAYLOADS["text"], "error": None},
            {**base, "sha256": "b", "path": f"/x/{FILE_NAMES[1]}", "score": None,
             "reasoning": None, "text": PAYLOADS["text"], "error": None},
            {**base, "sha256": "c", "path": "/x/<i>c</i>.jpg", "score": None, "reasoning": None,
             "text": None, "error": PAYLOADS["error"]}]
    page = render_report(rows, {}, title="<script>alert('title')</script>")
    audit_report(page)
    assert "&lt;script&gt;alert(&#x27;title&#x27;)&lt;/script&gt;" in page
