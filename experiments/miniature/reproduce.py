"""A miniature Q-Ponder reproduction on a CPU: distill → SFT → GRPO → eval (README.md beside it).

    source scripts/blas_env.sh        # Linux: MLX's CPU wheel links the reference BLAS
    .venv/bin/python experiments/miniature/reproduce.py --out runs/repro --seed 0

What it does, each step a subprocess logged to OUT/logs/ (the product's `qponder` commands where
the product has the step, this folder's scripts where the step exists only for the miniature):

1. `synth_iqa.py OUT/data`: a KADID-style set (scikit-image CC0 photos × Gaussian blur, white
   noise and JPEG at KADID-10k's 5 levels, labelled with KADID's mean MOS per level), split by
   photo into train.jsonl and test.jsonl; train photos also as random crops (--crops).
2. A tiny Qwen2.5-VL student in OUT/student_base (`vision_stem.build_student`: the product's tiny
   random model with the fixed DCT-energy stem in its vision tower), whitened (`whiten_stem.py`).
3. `distill_synthetic.py`: the stand-in teacher writes reasoning from each train image's known
   distortion and level, with noisy scores; the product's agreement filter keeps the agreeing ones.
4. `qponder train --stage sft` (configs/sft.toml) → OUT/sft/adapters (Q-Ponder-CI).
5. `train_grpo.py` (configs/grpo.toml: the product's GRPO plus the miniature's own settings)
   from the SFT adapter → OUT/grpo/adapters (Q-Ponder); reward per component per step in
   OUT/grpo/metrics.jsonl and curves.html.
6. `qponder eval` of both students on the held-out photos, reason and fast mode.
7. BRISQUE (OpenCV contrib + Debian's opencv-data model) and PIQE (pypiqe) on the same test
   images, if installed (`pip install 'qponder-mlx[bench]'`, `apt-get install opencv-data`).

Then SRCC/PLCC pooled and per distortion type for every row, the reward curves as SVG, the
table in OUT/results.md (+ .json), the time of every stage, and three lines:

    RESULT repro_grpo_srcc <x> goal 0.93
    RESULT repro_grpo_minus_sft_srcc <x> goal 0.03
    RESULT repro_grpo_minus_brisque_srcc <x> goal 0.0

and, with `test_crops` (random views of the held-out photos), the same three on all held-out views
(`..._all_views`): 45 centre images are a small sample, one level mistaken moves SRCC by ~0.02.

Rerunning with the same --out resumes: finished stages are skipped, an interrupted training run
continues from its checkpoint (`--resume`), distillation skips finished images.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
from stem_whitening import RECORD  # noqa: E402
from synth import view_index  # noqa: E402

from qponder_mlx import metrics  # noqa: E402
from qponder_mlx.io import (  # noqa: E402
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    read_jsonl,
)
from qponder_mlx.train.config import (  # noqa: E402
    ConfigError,
    config_dict,
    load_config,
    read_config_file,
)

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
BRISQUE_DIR = Path("/usr/share/opencv4/quality")  # Debian/Ubuntu `opencv-data`
GOALS = {"srcc": 0.93, "grpo_minus_sft": 0.03, "grpo_minus_brisque": 0.0}
ALL_VIEWS = ", all views"  # row-name suffix for the scores on every view of the held-out photos
LAST_STEP = "Q-Ponder (GRPO, last step)"  # rows of GRPO's last weights when adapters averages
EXPECTED = ", expected read-out"  # reason rows read as E[answer] (qponder eval --readout expected)


def expected_row(name: str) -> str:
    """'X, reason[, all views]' -> 'X, reason, expected read-out[, all views]'."""
    base, views = (name[:-len(ALL_VIEWS)], ALL_VIEWS) if name.endswith(ALL_VIEWS) else (name, "")
    return base + EXPECTED + views


# ---------------------------------------------------------------- settings


@dataclass
class DataSettings:
    size: int = 112  # centre-crop side; the students see every image at exactly this size
    photos: str = ""  # comma-separated scikit-image CC0 photos ("" = all thirteen)
    test_photos: str = "coffee,rocket,grass"
    seed: int = 0
    crops: int = 0  # extra random crops per TRAIN photo (synth_iqa.py --crops)
    test_crops: int = 0  # extra random crops per TEST photo: a second, larger held-out set


@dataclass
class StudentSettings:
    seed: int = 0
    hidden_size: int = 128
    num_layers: int = 2
    vocab_size: int = 640
    vision_hidden: int = 320
    vision_depth: int = 3
    vision_stem: str = "dct"  # vision_stem.py; "random" = a plain random tower
    # Whiten the image tokens over the TRAIN images (whiten_stem.py; labels unused):
    # every direction the tokens vary in equally strong for the language model to read
    whiten: bool = False


@dataclass
class DistillSettings:
    samples_per_image: int = 2
    temperature: float = 0.7
    max_score_error: float = 0.5
    # Cold-start subset: the teacher writes reasoning for only the first `views` views of each
    # train photo (the photo itself, then its crops in order); 0 = every view. GRPO still trains on
    # every view: its reward needs only the MOS, the teacher's text is the costly part.
    views: int = 0
    # Cold start on some train photos: the teacher writes reasoning only for the views of these
    # photos (comma-separated; "" = every train photo), GRPO still trains on every photo. The
    # paper's setting: the teacher's text is costly, human MOS exists for a larger set, so what the
    # cold start never saw is what GRPO's reward can add (History AY).
    photos: str = ""
    # A miscalibrated teacher (`distill_synthetic.py --bias`): offsets of its scores per
    # distortion type, "" = calibrated. GRPO's reward reads the human MOS, so correcting what the
    # filter let through is GRPO's job (History AX).
    bias: str = ""
    # A coarse teacher (`distill_synthetic.py --coarse`): 3 severities per distortion, the
    # finer order left to GRPO's reward (History AZ).
    coarse: bool = False
    # Fast answers as levels (History CH): this share of the kept rows also goes to SFT answered
    # `<think></think><answer>N</answer>`, N the teacher's score rounded to a whole level (Q-Align's
    # training targets, read back by fast mode's E[leading digit]); written to
    # distill/train_fast_levels.jsonl, which SFT then reads. 0 = off.
    fast_level_share: float = 0.0


@dataclass
class EvalSettings:
    batch_size: int = 16
    max_tokens: int = 160


@dataclass
class ReproConfig:
    data: DataSettings = field(default_factory=DataSettings)
    student: StudentSettings = field(default_factory=StudentSettings)
    distill: DistillSettings = field(default_factory=DistillSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    base: str = ""  # another pipeline TOML beside this one: its settings, then this file's
    sft_config: str = "sft.toml"  # relative to the pipeline file
    grpo_config: str = "grpo.toml"
    # `qponder train --set key=value` overrides on top of those files (e.g. ["iters=60"]), so a
    # variant recipe names what it changes instead of copying a whole train TOML
    sft_set: list[str] = field(default_factory=list)
    grpo_set: list[str] = field(default_factory=list)
    # A null for what GRPO's MOS rewards steer (History BW): GRPO trains on train.jsonl with the
    # MOS permuted across its rows (seeded by the student's seed), so accuracy and rank read a
    # label that has nothing to do with the image; format and consistency are unchanged.
    grpo_shuffled_mos: bool = False


# ---------------------------------------------------------------- running our commands


def load_pipeline(path: Path, _chain: tuple[Path, ...] = ()) -> ReproConfig:
    """A pipeline TOML. `base = "other.toml"` (beside it) gives every setting the file leaves out,
    so a variant recipe holds only what it changes; a base may name its own base (the nearer file
    wins, lists such as grpo_set are replaced whole)."""
    chain = (*_chain, path.resolve())
    name = read_config_file(path).get("base")
    below: dict = {}
    if name:
        if (path.parent / name).resolve() in chain:
            raise ConfigError(f"{path}: base {name} leads back to itself "
                              f"({' -> '.join(p.name for p in chain)} -> {name}) — break the loop")
        below = config_dict(load_pipeline(path.parent / name, chain))
    return load_config(ReproConfig, path, base=below)


def shuffled_mos_rows(rows: list[dict], seed: int) -> list[dict]:
    """`rows` in their order, each with the MOS of another row (one permutation of all of them):
    the labels' distribution is kept, their link to the images is gone."""
    perm = np.random.default_rng(seed).permutation(len(rows))
    return [{**r, "mos": rows[int(j)]["mos"]} for r, j in zip(rows, perm)]


def fast_level_rows(rows: Iterable[dict], share: float, seed: int) -> list[dict]:
    """`rows` plus, for the share the product's `fast_answers.chosen` picks, a copy answered
    with an empty reasoning and the teacher's score rounded to a whole level."""
    from qponder_mlx.train.fast_answers import FAST_SUFFIX, chosen, whole_level

    rows, extra = list(rows), []
    for r in rows:
        if chosen(r["id"], share, seed):
            level = whole_level(float(r["teacher_score"]))
            answer = f"<think></think><answer>{level}</answer>"
            messages = [*r["messages"][:-1], {"role": "assistant", "content": answer}]
            extra.append({**r, "id": r["id"] + FAST_SUFFIX, "messages": messages})
    return rows + extra


def cold_start_rows(rows: Iterable[dict], *, views: int = 0, photos: str = "",
                    where: Path | str = "train.jsonl") -> list[dict]:
    """The rows the teacher writes reasoning for: the first `views` views of each photo (0 = all)
    of the named photos ("" = all). A name that is no train photo is a config error, not an
    empty cold start."""
    rows = list(rows)  # read twice: a generator (read_jsonl) would come back empty
    named = [p.strip() for p in photos.split(",") if p.strip()]
    unknown = sorted(set(named) - {r["reference"] for r in rows})
    if unknown:
        raise ConfigError(f"[distill] photos: {', '.join(unknown)} is no train photo of {where} — "
                          f"name photos from the [data] photos that are not test_photos")
    return [r for r in rows
            if (not views or view_index(r["reference"], r["view"]) < views)
            and (not named or r["reference"] in named)]


class StageError(RuntimeError):
    pass


def blas_warning() -> str | None:
    """MLX's Linux CPU wheel links the reference BLAS (~20× slower matmuls than OpenBLAS)."""
    if platform.system() == "Linux" and "openblas" not in os.environ.get("LD_PRELOAD", ""):
        return ("warning: LD_PRELOAD has no OpenBLAS — MLX falls back to the reference BLAS and "
                "this run takes many times longer; `source scripts/blas_env.sh` first")
    return None


class Runner:
    """Runs `qponder ARGV`, or one of this folder's scripts, as a subprocess (default) or in this
    process (fast smoke tests: the same command functions, without ~4 s of imports each)."""

    def __init__(self, out: Path, *, in_process: bool = False, echo=print):
        self.out, self.in_process, self.echo = out, in_process, echo
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.commands_file = out / "commands.sh"

    def record(self, line: str) -> None:
        """Append to OUT/commands.sh: every command this output folder saw, resumes included."""
        with self.commands_file.open("a", encoding="utf-8") as f:
            f.write(line + "\n")

    def __call__(self, name: str, argv: list[str], script: str | None = None) -> None:
        """`script`: a file of this folder (its `main(argv)` in process), else `qponder`."""
        head = f"python {HERE / script}" if script else "qponder"
        line = head + " " + " ".join(shlex.quote(a) for a in argv)
        self.record(line)
        log = self.logs / f"{name}.log"
        self.echo(f"  $ {line}")
        cmd = ([sys.executable, str(HERE / script)] if script
               else [sys.executable, "-m", "qponder_mlx.cli.main"])
        with log.open("a", encoding="utf-8") as f:
            f.write(f"$ {line}\n")
            f.flush()
            if self.in_process:
                rc = self._script(script, argv, f) if script else self._inline(argv, f)
            else:
                rc = subprocess.call([*cmd, *argv], stdout=f, stderr=subprocess.STDOUT)
        if rc:
            tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
            raise StageError(f"{name}: `{line}` exited {rc}; last lines of {log}:\n    "
                             + "\n    ".join(tail))

    @staticmethod
    def _script(script: str, argv: list[str], f) -> int:
        import importlib

        module = importlib.import_module(Path(script).stem)
        with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            return module.main(argv)

    @staticmethod
    def _inline(argv: list[str], f) -> int:
        import click
        from qponder_mlx.cli.main import app

        with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            try:
                rc = app(args=argv, prog_name="qponder", standalone_mode=False)
            except click.exceptions.Exit as e:
                rc = e.exit_code
            except click.ClickException as e:
                e.show(file=f)
                rc = e.exit_code
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
        return rc if isinstance(rc, int) else 0


# ---------------------------------------------------------------- classic metrics


def classic_scores(images: list[Path]) -> dict[str, list[float] | str]:
    """BRISQUE and PIQE per image (lower = better, as published), or why a metric is missing."""
    out: dict[str, list[float] | str] = {}
    try:
        import cv2
    except ImportError:
        msg = "opencv not installed (pip install opencv-contrib-python-headless)"
        return {"BRISQUE": msg, "PIQE": msg}
    model, rng = BRISQUE_DIR / "brisque_model_live.yml", BRISQUE_DIR / "brisque_range_live.yml"
    if not hasattr(getattr(cv2, "quality", None), "QualityBRISQUE_compute"):
        out["BRISQUE"] = ("cv2.quality missing: another OpenCV wheel overwrote the contrib one — "
                          "pip install --force-reinstall opencv-contrib-python-headless")
    elif not (model.exists() and rng.exists()):
        out["BRISQUE"] = f"no BRISQUE model files in {BRISQUE_DIR} (apt-get install opencv-data)"
    else:
        out["BRISQUE"] = [float(cv2.quality.QualityBRISQUE_compute(
            cv2.imread(str(p)), str(model), str(rng))[0]) for p in images]
    try:
        from pypiqe import piqe
    except ImportError:
        out["PIQE"] = "pypiqe not installed (pip install pypiqe)"
    else:
        out["PIQE"] = [float(piqe(cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2GRAY))[0])
                       for p in images]
    return out


# ---------------------------------------------------------------- metrics table


def agreement(pred: list[float | None], mos: list[float], kinds: list[str]) -> dict:
    """SRCC/PLCC pooled and per distortion type over the answered samples."""
    def block(idx: list[int]) -> dict:
        ok = [i for i in idx if pred[i] is not None]
        if len(ok) < 3:
            return {"n": len(ok), "srcc": None, "plcc": None}
        p, m = [pred[i] for i in ok], [mos[i] for i in ok]
        s, c = metrics.srcc(p, m), metrics.plcc(p, m)
        return {"n": len(ok), "srcc": None if np.isnan(s) else round(s, 4),
                "plcc": None if np.isnan(c) else round(c, 4)}

    out = {"pooled": block(list(range(len(mos))))}
    for kind in sorted(set(kinds)):
        out[kind] = block([i for i, k in enumerate(kinds) if k == kind])
    return out


def report_scores(report: dict, readout: str = "text") -> dict[str, float | None]:
    """id -> score of an eval report (`qponder eval --out`): "text", the numbers the model wrote
    (the paper's read-out); "expected", the expected read-out — only a report made with
    `--readout expected` has it (empty otherwise), and such a report also holds the written."""
    expected = report.get("readout", "text") == "expected"
    if readout == "expected" and not expected:
        return {}
    key = "written_score" if expected and readout == "text" else "score"
    return {r["id"]: r[key] for r in report["samples"]}


def eval_scores(report: dict, ids: list[str], readout: str = "text") -> list[float | None]:
    """The scores of an eval report in the order of `ids` (see `report_scores`)."""
    by_id = report_scores(report, readout)
    return [by_id.get(i) for i in ids]


def pooled(rows: dict[str, dict], name: str, key: str = "srcc") -> float | None:
    """One table row's pooled correlation (None when the row is missing or was skipped)."""
    return rows.get(name, {}).get("agreement", {}).get("pooled", {}).get(key)


def fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def results_table(rows: dict[str, dict], kinds: list[str]) -> str:
    head = ("| method | photos | n scored | format | SRCC | PLCC | MAE | distinct answers | "
            + " | ".join(f"SRCC {k}" for k in kinds) + " |")
    lines = [head, "|" + "---|" * (8 + len(kinds))]
    for name, r in rows.items():
        if "skipped" in r:
            lines.append(f"| {name} | {r['photos']} | – | – | skipped: {r['skipped']} |"
                         + " |" * (3 + len(kinds)))
            continue
        a = r["agreement"]
        lines.append(f"| {name} | {r['photos']} | {a['pooled']['n']} | "
                     f"{fmt(r.get('format_rate'))} | {fmt(a['pooled']['srcc'])} | "
                     f"{fmt(a['pooled']['plcc'])} | {fmt(r.get('mae'))} | "
                     f"{r.get('distinct_answers', '–')} | "
                     + " | ".join(fmt(a.get(k, {}).get("srcc")) for k in kinds) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- curves


REWARD_KEYS = [("reward_mean", "total"), ("reward_format_mean", "format"),
               ("reward_accuracy_mean", "accuracy"), ("reward_consistency_mean", "consistency"),
               ("reward_rank_mean", "rank")]


def write_figures(out: Path, figures: Path) -> list[Path]:
    """Reward per component and reward spread over GRPO steps, SFT loss: standalone SVGs."""
    from qponder_mlx.train.runlog import svg_chart

    def series(run: str, keys) -> list:
        rows = [r for r in read_jsonl(out / run / "metrics.jsonl") if r.get("kind") == "train"]
        out_ = [(label, [(r["step"], r[k]) for r in rows if r.get(k) is not None])
                for k, label in keys]
        return [(label, pts) for label, pts in out_ if pts]  # e.g. no rank reward configured

    figures.mkdir(parents=True, exist_ok=True)
    charts = {
        "repro_grpo_rewards.svg": svg_chart("GRPO reward per component (train batch mean)",
                                            series("grpo", REWARD_KEYS)),
        "repro_grpo_signal.svg": svg_chart(
            "GRPO: reward std within the batch, score MAE vs MOS, format rate",
            series("grpo", [("reward_std", "reward std"), ("score_mae", "score MAE"),
                            ("format_rate", "format rate")])),
        "repro_sft_loss.svg": svg_chart("SFT loss (assistant tokens)",
                                        series("sft", [("loss", "train loss")]), log_y=True),
    }
    paths = []
    for name, svg in charts.items():
        atomic_write_text(figures / name, svg)
        paths.append(figures / name)
    return paths


# ---------------------------------------------------------------- the pipeline


def run_pipeline(cfg: ReproConfig, pipeline_dir: Path, out: Path, *, in_process: bool = False,
                 figures: Path | None = None, echo=print, sft_only: bool = False) -> dict:
    """Run (or resume) every stage; returns the results dict (also OUT/results.json).
    `sft_only`: stop after SFT and its held-out evals (OUT/sft_results.json)."""
    out.mkdir(parents=True, exist_ok=True)
    run = Runner(out, in_process=in_process, echo=echo)
    timings_path = out / "timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) \
        if timings_path.exists() else {}
    data, base = out / "data", out / "student_base"
    sft_cfg = (pipeline_dir / cfg.sft_config).resolve()
    grpo_cfg = (pipeline_dir / cfg.grpo_config).resolve()
    pixels = cfg.data.size ** 2
    px = ["--min-pixels", str(pixels), "--max-pixels", str(pixels)]

    def stage(name: str, done: Path, work) -> None:
        if done.exists():
            echo(f"[{name}] done earlier ({timings.get(name, 0):.0f} s) — skipped")
            return
        echo(f"[{name}]")
        t0 = time.perf_counter()
        work()
        # This run's time only: a stage that finished before was skipped above, so an entry
        # here is a stale one (its output was deleted to redo it, e.g. GRPO-only variants).
        timings[name] = round(time.perf_counter() - t0, 2)
        atomic_write_json(timings_path, timings)
        echo(f"[{name}] {timings[name]:.0f} s")

    def synth():
        argv = [str(data), "--size", str(cfg.data.size),
                "--test-photos", cfg.data.test_photos, "--seed", str(cfg.data.seed),
                "--crops", str(cfg.data.crops), "--test-crops", str(cfg.data.test_crops)]
        if cfg.data.photos:
            argv += ["--photos", cfg.data.photos]
        run("synth", argv, script="synth_iqa.py")

    def student():
        from vision_stem import build_student

        s = cfg.student
        build_student(base, seed=s.seed, hidden_size=s.hidden_size, num_layers=s.num_layers,
                      vocab_size=s.vocab_size, vision_hidden=s.vision_hidden,
                      vision_depth=s.vision_depth, vision_stem=s.vision_stem)
        run.record(f"# student base: vision_stem.build_student({base}, {asdict(s)})")
        if s.whiten:
            run("student", [str(base), "--data", str(data / "train.jsonl")],
                script="whiten_stem.py")

    def distill():
        d = cfg.distill
        source = data / "train.jsonl"
        if d.views or d.photos:
            source = data / "cold_start.jsonl"
            rows = cold_start_rows(read_jsonl(data / "train.jsonl"), views=d.views,
                                   photos=d.photos, where=data / "train.jsonl")
            atomic_write_jsonl(source, rows)
            which = []
            if d.views:
                which.append(f"whose view index (synth.view_index) is below {d.views}")
            if d.photos:
                which.append(f"of the photos {d.photos}")
            run.record(f"# cold start: {source} = the {len(rows)} rows of train.jsonl "
                       + " and ".join(which))
        run("distill", ["--data", str(source), "--out", str(out / "distill" / "train.jsonl"),
                        "--samples-per-image", str(d.samples_per_image),
                        "--temperature", str(d.temperature),
                        "--max-score-error", str(d.max_score_error),
                        *(["--bias", d.bias] if d.bias else []),
                        *(["--coarse"] if d.coarse else [])], script="distill_synthetic.py")

    def train(stage_name: str, extra: list[str], config: Path, sets: list[str]):
        run_dir = out / stage_name
        extra = [*extra, *(a for kv in sets for a in ("--set", kv))]
        resume = ["--resume"] if (run_dir / "checkpoints").exists() else []
        # The student's seed also seeds both trainers (LoRA init, data order, GRPO sampling).
        common = ["--config", str(config), "--model", str(base), "--out", str(run_dir), *extra,
                  *px, "--no-progress", "--seed", str(cfg.student.seed), *resume]
        if stage_name == "sft":
            run(stage_name, ["train", "--stage", "sft", *common])
        else:
            run(stage_name, common, script="train_grpo.py")

    # Each stage is done when the LAST file it writes exists.
    stage("synth", data / "train.jsonl", synth)
    stage("student", base / (RECORD if cfg.student.whiten else "generation_config.json"), student)
    stage("distill", out / "distill" / "train.summary.json", distill)
    sft_data = out / "distill" / "train.jsonl"
    if cfg.distill.fast_level_share:
        sft_data = out / "distill" / "train_fast_levels.jsonl"
        if not sft_data.exists():
            atomic_write_jsonl(sft_data, fast_level_rows(
                read_jsonl(out / "distill" / "train.jsonl"), cfg.distill.fast_level_share,
                cfg.student.seed))
            run.record(f"# fast answers as levels: {sft_data} = distill/train.jsonl plus a "
                       f"{cfg.distill.fast_level_share} share answered with the whole level")
    stage("sft", out / "sft" / "summary.json",
          lambda: train("sft", ["--data", str(sft_data)], sft_cfg, cfg.sft_set))
    grpo_data = data / "train.jsonl"
    if cfg.grpo_shuffled_mos:
        grpo_data = data / "train_shuffled_mos.jsonl"
        if not grpo_data.exists():
            atomic_write_jsonl(grpo_data, shuffled_mos_rows(list(read_jsonl(data / "train.jsonl")),
                                                            cfg.student.seed))
            run.record(f"# GRPO null: {grpo_data} = train.jsonl with its MOS permuted "
                       f"(seed {cfg.student.seed})")
    if not sft_only:
        stage("grpo", out / "grpo" / "miniature.json",
              lambda: train("grpo", ["--data", str(grpo_data),
                                     "--adapter", str(out / "sft" / "adapters")], grpo_cfg,
                            cfg.grpo_set))
    # Held-out photos (the measure: their centre views, and with test_crops also every view of
    # them, a larger sample of the same photos), plus the photos the students trained on (reason
    # mode; their centre views, like the held-out set, not the random crops): the gap between
    # held-out and seen tells memorising from learning.
    seen, views = data / "train_photos.jsonl", data / "held_out_views.jsonl"
    if not seen.exists():
        atomic_write_jsonl(seen, (r for r in read_jsonl(data / "train.jsonl")
                                  if r["view"] == r["reference"]))  # the photo, not its crops
    if cfg.data.test_crops and not views.exists():
        atomic_write_jsonl(views, (r for part in ("test", "test_crops")
                                   for r in read_jsonl(data / f"{part}.jsonl")))
    evals = {"Q-Ponder-CI (SFT), reason": ("sft", "reason", "test"),
             "Q-Ponder-CI (SFT), fast": ("sft", "fast", "test"),
             "Q-Ponder (GRPO), reason": ("grpo", "reason", "test"),
             "Q-Ponder (GRPO), fast": ("grpo", "fast", "test")}
    if cfg.data.test_crops:
        for name, run_name in (("Q-Ponder-CI (SFT)", "sft"), ("Q-Ponder (GRPO)", "grpo")):
            for mode in ("reason", "fast"):
                evals[f"{name}, {mode}{ALL_VIEWS}"] = (run_name, mode, "held_out_views")
    evals["Q-Ponder-CI (SFT), reason, train photos"] = ("sft", "reason", "train_photos")
    evals["Q-Ponder (GRPO), reason, train photos"] = ("grpo", "reason", "train_photos")
    # With GRPO's average_every, grpo/adapters is the weight mean; the last step's weights are
    # scored beside it (reason mode, held-out photos), so the table shows what averaging did.
    adapter_dirs = {"sft": out / "sft" / "adapters", "grpo": out / "grpo" / "adapters",
                    "grpo_last": out / "grpo" / "adapters_last"}
    if adapter_dirs["grpo_last"].is_dir():
        evals[f"{LAST_STEP}, reason"] = ("grpo_last", "reason", "test")
        if cfg.data.test_crops:
            evals[f"{LAST_STEP}, reason{ALL_VIEWS}"] = ("grpo_last", "reason", "held_out_views")
    if sft_only:
        evals = {k: v for k, v in evals.items() if v[0] == "sft" and v[2] != "train_photos"}
    photos_of = {"test": "held-out", "held_out_views": "held-out, all views",
                 "train_photos": "seen"}

    def report_path(run_name: str, mode: str, split: str) -> Path:
        return out / "eval" / (f"{run_name}_{mode}.json" if split == "test"
                               else f"{run_name}_{mode}_{split}.json")

    for run_name, mode, split in evals.values():
        report = report_path(run_name, mode, split)
        stage(report.stem, report,
              lambda r=run_name, m=mode, p=report, sp=split: run(
                  f"eval_{p.stem}", ["eval", "--data", str(data / f"{sp}.jsonl"),
                                     "--model", str(base), "--adapter", str(adapter_dirs[r]),
                                     "--mode", m, "--batch-size", str(cfg.eval.batch_size),
                                     # one greedy decode gives both read-outs (written, expected)
                                     *(["--readout", "expected"] if m == "reason" else []),
                                     "--max-tokens", str(cfg.eval.max_tokens), *px,
                                     "--out", str(p)]))

    # ---- the table
    labels = {sp: list(read_jsonl(data / f"{sp}.jsonl")) for _, _, sp in evals.values()}
    rows: dict[str, dict] = {}
    for name, (run_name, mode, split) in evals.items():
        report = json.loads(report_path(run_name, mode, split).read_text())
        rows_ = labels[split]
        ids, mos = [r["id"] for r in rows_], [float(r["mos"]) for r in rows_]
        types = [r["distortion"] for r in rows_]
        # A report from before --readout expected holds the written numbers only.
        for readout in ("text", "expected") if report.get("readout") == "expected" else ("text",):
            pred = eval_scores(report, ids, readout)
            answered = [(p, m) for p, m in zip(pred, mos) if p is not None]
            row_name = name if readout == "text" else expected_row(name)
            rows[row_name] = {
                "photos": photos_of[split],
                "agreement": agreement(pred, mos, types),
                "format_rate": report.get("format_rate"), "seconds": report["seconds"],
                # on the MOS scale (classic metrics have none); few distinct answers =
                # many ties, which cost rank order even when every answer is close
                "mae": round(metrics.mae(*zip(*answered)), 4) if answered else None,
                "distinct_answers": len({p for p, _ in answered})}
    if sft_only:
        results = {"rows": rows, "timings_s": timings, "config": asdict(cfg)}
        atomic_write_json(out / "sft_results.json", results)
        for name, r in rows.items():
            echo(f"{name}: SRCC {pooled(rows, name)} MAE {r['mae']}")
        return results
    t0 = time.perf_counter()
    for split, suffix in (("test", ""), ("held_out_views", ALL_VIEWS)):
        images = labels.get(split, [])
        if not images:
            continue
        mos = [float(r["mos"]) for r in images]
        types = [r["distortion"] for r in images]
        for name, scores in classic_scores([data / r["image"] for r in images]).items():
            if isinstance(scores, str):
                echo(f"{name}: skipped — {scores}")
                rows[name + suffix] = {"photos": photos_of[split], "skipped": scores}
            else:  # lower is better: negate so that every row's correlation is "higher = better"
                rows[name + suffix] = {"photos": photos_of[split],
                                       "agreement": agreement([-s for s in scores], mos, types)}
    timings["classic"] = round(time.perf_counter() - t0, 2)

    kinds_sorted = sorted({r["distortion"] for r in labels["test"]})
    table = results_table(rows, kinds_sorted)
    curves = write_figures(out, figures or out / "figures")
    grpo_rows = [r for r in read_jsonl(out / "grpo" / "metrics.jsonl") if r.get("kind") == "train"]
    reward_std = [r["reward_std"] for r in grpo_rows if r.get("reward_std") is not None]
    total = round(sum(timings.values()), 1)
    atomic_write_json(timings_path, timings)

    def headline(suffix: str, readout: str = "text") -> dict[str, float | None]:
        name = (lambda n: n + suffix) if readout == "text" else (
            lambda n: expected_row(n + suffix))
        grpo, sft = pooled(rows, name("Q-Ponder (GRPO), reason")), pooled(
            rows, name("Q-Ponder-CI (SFT), reason"))
        brisque = pooled(rows, f"BRISQUE{suffix}")
        return {"grpo_srcc": grpo,
                "grpo_minus_sft_srcc": None if grpo is None or sft is None else grpo - sft,
                "grpo_minus_brisque_srcc": None if grpo is None or brisque is None
                else grpo - brisque}

    results = {
        "rows": rows, "timings_s": timings, "total_s": total,
        "commands": run.commands_file.read_text().splitlines() if run.commands_file.exists()
        else [],
        "distill": json.loads((out / "distill" / "train.summary.json").read_text()),
        "grpo_reward_std_mean": float(np.mean(reward_std)) if reward_std else None,
        "grpo_steps_with_signal": sum(s > 0 for s in reward_std),
        "grpo_steps": len(grpo_rows), "figures": [str(p) for p in curves],
        "config": asdict(cfg),
        "load_average_at_end": list(os.getloadavg()), "cpu_count": os.cpu_count(),
        "headline": headline(""),
    }
    if cfg.data.test_crops:
        results["headline_all_views"] = headline(ALL_VIEWS)
    if expected_row("Q-Ponder (GRPO), reason") in rows:
        results["headline_expected"] = headline("", "expected")
        if cfg.data.test_crops:
            results["headline_all_views_expected"] = headline(ALL_VIEWS, "expected")
    atomic_write_json(out / "results.json", results)
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    atomic_write_text(out / "results.md", f"{table}\n\nTime: {total:.0f} s ({stages})\n")
    echo("\n" + table)
    echo(f"\ntime: {total / 60:.1f} min ({stages}); load average now "
         f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    echo(f"GRPO reward std: mean {results['grpo_reward_std_mean']}, "
         f"{results['grpo_steps_with_signal']}/{len(grpo_rows)} steps with signal")
    return results


def result_lines(results: dict) -> list[str]:
    """The three goals on the held-out centre views, and again on all held-out views."""
    def v(x: float | None) -> str:
        return "nan" if x is None else f"{x:.4f}"

    lines = []
    for key, suffix in (("headline", ""), ("headline_all_views", "_all_views"),
                        ("headline_expected", "_expected_readout"),
                        ("headline_all_views_expected", "_all_views_expected_readout")):
        if key in results:
            h = results[key]
            lines += [f"RESULT repro_grpo_srcc{suffix} {v(h['grpo_srcc'])} goal {GOALS['srcc']}",
                      f"RESULT repro_grpo_minus_sft_srcc{suffix} {v(h['grpo_minus_sft_srcc'])} "
                      f"goal {GOALS['grpo_minus_sft']}",
                      f"RESULT repro_grpo_minus_brisque_srcc{suffix} "
                      f"{v(h['grpo_minus_brisque_srcc'])} goal {GOALS['grpo_minus_brisque']}"]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/repro"))
    ap.add_argument("--config", type=Path, default=CONFIGS / "pipeline.toml",
                    help="pipeline TOML (data, student, distill, eval; names the train TOMLs)")
    ap.add_argument("--figures", type=Path, default=None,
                    help="where the SVG curves go (default OUT/figures)")
    ap.add_argument("--in-process", action="store_true",
                    help="run the qponder commands in this process (smoke tests)")
    ap.add_argument("--fresh", action="store_true", help="delete OUT first")
    ap.add_argument("--sft-only", action="store_true",
                    help="stop after SFT and its held-out evals (OUT/sft_results.json)")
    ap.add_argument("--seed", type=int, default=None,
                    help="training seed: the student's random weights, the LoRA init, the data "
                         "order and GRPO's sampling (the images and the teacher's answers stay "
                         "the same); default: [student] seed of the pipeline TOML")
    args = ap.parse_args(argv)
    warn = blas_warning()
    if warn:
        print(warn, file=sys.stderr)
    try:
        cfg = load_pipeline(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.seed is not None:
        cfg.student.seed = args.seed
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    t0 = time.perf_counter()
    try:
        results = run_pipeline(cfg, args.config.resolve().parent, args.out,
                               in_process=args.in_process, figures=args.figures,
                               sft_only=args.sft_only)
    except (StageError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.sft_only:
        print(f"wall time of this invocation: {(time.perf_counter() - t0) / 60:.1f} min")
        return 0
    print(f"wall time of this invocation: {(time.perf_counter() - t0) / 60:.1f} min "
          f"(all stages, resumes included: {results['total_s'] / 60:.1f} min)")
    for line in result_lines(results):
        print(line)
    if warn:
        print(warn, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
