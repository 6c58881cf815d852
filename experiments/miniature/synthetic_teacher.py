"""Teacher backend: a SYNTHETIC stand-in for a large VLM, for synth_iqa.py sets only.

Offline there is no 72B teacher. For a KADID-style synthetic set the truth about each image is
known: which distortion was applied and how strongly. This teacher writes reasoning from that
knowledge, in words, with several phrasings per quality dimension (so a student has to look at
the image to pick the right description, not memorise one sentence), and a score near KADID's
mean human MOS for that (type, level) — with seeded noise, and now and then a misread level
(described and scored as the neighbouring level), so the blind agreement filter has real work.

Optionally MISCALIBRATED (`bias`, e.g. "noise=+0.5,blur=-0.4"): a real teacher's scale is not
the human one, and how far it is off depends on the distortion (a VLM may read grain as milder
than people do). The blind answers are then centred on the level's MOS plus that type's offset;
the agreement filter removes the worst of it, the rest reaches the student — what GRPO's reward,
which reads the human MOS, is there to correct (docs/reproduction.md, History AX).

Optionally COARSE (`coarse`): a real VLM tells apart a few severities, not KADID's five (LMMs
rate on a handful of text-defined levels — the premise of Q-Align). This teacher then sees each
distortion's levels in three bins, {1, 2}, {3} and {4, 5}: it describes a level drawn from the
bin and scores the bin's mean MOS, so levels inside a bin get the same answer on average. The
finer order is in the human MOS only — what GRPO's reward can add (History AZ).

Used by the miniature reproduction (distill_synthetic.py) and tests; never a real teacher. Its
`model` name starts with "synthetic-" and lands in every row's `teacher_model`.

Where the facts come from: the label rows' `distortion` and `level` fields (synth_iqa.py writes
them), looked up by sample id in the label file given as `--labels`, or else in the
`labels.jsonl` found in the image's folder or the one above it (synth_iqa.py's layout).
"""

from __future__ import annotations

import json
import random
import threading
from collections import Counter
from pathlib import Path

from synth import LEVEL_MOS, level_mos

from qponder_mlx.distill.teacher_prompts import TeacherPrompt, teacher_prompt
from qponder_mlx.distill.teachers import TeacherError, TeacherReply
from qponder_mlx.labels import Sample
from qponder_mlx.prompts import format_response

TEACHER_NAME = "synthetic-kadid-v1"
# At temperature 1: score noise SD (1-5 scale) and the chance of misreading the level by one.
NOISE_SD_AT_T1 = 0.35
CONFUSION_AT_T1 = 0.15
LABEL_FILE = "labels.jsonl"
# The severities a coarse teacher tells apart: KADID levels per bin (`coarse`).
COARSE_BINS = ((1, 2), (3,), (4, 5))

# Phrasings per quality dimension and KADID level (index 0 = level 1, mild .. 4 = level 5).
SHARPNESS = {
    "clean": ["The photo is sharp and well focused.", "Edges are crisp and fine detail is clear.",
              "Focus is good and the image is sharp."],
    "blur": [
        ["The photo is sharp and well focused.", "Edges are crisp and fine detail is clear.",
         "Focus is good and the image is sharp."],
        ["The photo is sharp, only slightly soft in fine detail.",
         "Focus is good, with a hint of softness at fine edges.",
         "Edges are a little soft but detail is kept."],
        ["The image is soft and fine detail is lost to blur.",
         "Moderate blur softens edges and texture.",
         "Focus is soft; fine texture is blurred."],
        ["The image is blurry and edges are smeared.", "Strong blur removes most detail.",
         "The photo is clearly out of focus."],
        ["The image is very blurry; shapes are barely visible.",
         "Severe blur wipes out all detail.", "The photo is badly out of focus and smeared."],
    ],
}
NOISE = {
    "clean": ["There is no visible noise.", "Flat areas are clean, without grain.",
              "Noise is low."],
    "noise": [
        ["Light grain is visible in flat areas.", "There is faint noise in smooth regions.",
         "A little noise shows in the shadows."],
        ["Some noise and grain are visible.", "Noise is noticeable in flat areas.",
         "There is visible grain across smooth regions."],
        ["Clear noise covers flat areas.", "Noise and grain are clearly visible.",
         "The image is grainy in smooth regions."],
        ["Strong noise covers the image.", "Heavy grain hides fine detail.",
         "The photo is very noisy."],
        ["Severe noise covers the whole image.", "Very heavy grain hides detail everywhere.",
         "The image is dominated by noise."],
    ],
}
COMPRESSION = {
    "clean": ["No compression artifacts are visible.", "There are no blocking artifacts.",
              "Compression artifacts are absent."],
    "jpeg": [
        ["Mild JPEG compression leaves faint artifacts near edges.",
         "Faint compression ringing shows near edges.",
         "Light JPEG artifacts are barely visible."],
        ["Mild JPEG compression leaves small artifacts near edges.",
         "Some compression ringing shows near edges.",
         "Light JPEG artifacts are visible at edges."],
        ["JPEG compression causes visible blocking and ringing.",
         "Compression artifacts are visible in flat areas.",
         "Blocking and ringing from JPEG compression are visible."],
        ["Strong JPEG compression causes blocking and lost detail.",
         "Heavy blocking artifacts break up smooth areas.",
         "Strong compression leaves blocks and banding."],
        ["Severe JPEG blocking breaks the image into squares.",
         "Extreme compression destroys detail with large blocks.",
         "The image is ruined by heavy blocking artifacts."],
    ],
}
EXPOSURE = ["Exposure and colour look natural.", "Colours are natural and exposure is balanced.",
            "Exposure is fine and colours are normal."]
OVERALL = ["Overall the quality is {word}.", "Overall, {word} quality.",
           "All in all the photo is {word}."]
# The 1-5 scale's own words (the student prompt: 1 bad .. 5 excellent), by score.
QUALITY_WORDS = [(4.5, "excellent"), (3.5, "good"), (2.5, "fair"), (1.5, "poor"), (-1, "bad")]


def parse_bias(text: str) -> dict[str, float]:
    """"noise=+0.5,blur=-0.4" -> {"noise": 0.5, "blur": -0.4}; "" -> {}. Types are synth's."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, _, value = part.partition("=")
        kind = kind.strip()
        try:
            offset = float(value)  # "" (no "=") fails here too
        except ValueError:
            offset = float("nan")
        if kind not in LEVEL_MOS or not abs(offset) < 4 or kind in out:
            raise ValueError(f"--bias: bad entry {part!r} — write TYPE=OFFSET pairs, "
                             f"each type once ({', '.join(LEVEL_MOS)}), offsets on the 1-5 "
                             "scale, e.g. 'noise=+0.5,blur=-0.4'")
        out[kind] = offset
    return out


def coarse_bin(level: int) -> tuple[int, ...]:
    """The bin of COARSE_BINS that holds KADID `level`."""
    return next(b for b in COARSE_BINS if level in b)


def quality_word(score: float) -> str:
    return next(word for floor, word in QUALITY_WORDS if score >= floor)


def describe(distortion: str, level: int, rng: random.Random) -> str:
    """Reasoning for an image with `distortion` at KADID `level` (1..5), one phrasing per
    dimension drawn from `rng` (focus, noise, compression, exposure/colour)."""
    if distortion not in LEVEL_MOS or not 1 <= level <= 5:
        raise ValueError(f"unknown distortion {distortion!r} level {level}")

    def pick(table: dict, kind: str) -> str:
        return rng.choice(table[kind][level - 1] if kind == distortion else table["clean"])

    return " ".join([pick(SHARPNESS, "blur"), pick(NOISE, "noise"), pick(COMPRESSION, "jpeg"),
                     rng.choice(EXPOSURE)])


def read_level(text: str) -> tuple[str, int] | None:
    """The (distortion, level) a reasoning text describes in this teacher's words — the inverse
    of `describe`, for reading what a student trained on them chose (bench/level_reads.py, git).

    A noise or JPEG phrase names that distortion; otherwise the focus phrase names the blur level
    (level 1 reads as the clean wording, as `describe` writes it). None when no phrase is found.
    """
    for kind, table in (("noise", NOISE), ("jpeg", COMPRESSION)):
        for level, phrases in enumerate(table[kind], start=1):
            if any(p in text for p in phrases):
                return kind, level
    for level, phrases in enumerate(SHARPNESS["blur"], start=1):
        if any(p in text for p in phrases):
            return "blur", level
    return None


def read_metadata(path: str | Path) -> dict[str, tuple[str, int]]:
    """{id and resolved image path: (distortion, level)} from a synth_iqa.py label file."""
    path = Path(path)
    out: dict[str, tuple[str, int]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the synthetic teacher's label file "
                         f"({e.strerror or e}) — pass the labels.jsonl of a synth_iqa.py set") \
            from None
    for line in lines:
        try:
            row = json.loads(line)
            facts = (str(row["distortion"]), int(row["level"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # rows without the facts are simply unknown to this teacher
        if row.get("id") is not None:
            out[str(row["id"])] = facts
        if row.get("image"):
            out[str((path.parent / row["image"]).resolve())] = facts
    return out


class SyntheticTeacher:
    """`Teacher` that knows each image's distortion and level (see module docstring).

    `temperature` scales the imperfection: score noise SD 0.35·T and a 0.15·T chance of
    misreading the level by one; T = 0 answers the level's MOS exactly. `bias` shifts blind
    answers by a fixed offset per distortion type (`parse_bias`; guided prompts show the human
    score, which the teacher then follows). `coarse` reads levels in COARSE_BINS: a blind answer
    describes a level of the bin and scores the bin's mean MOS. Answers are seeded by (seed,
    sample id, attempt number), so a rerun writes the same file.
    """

    max_concurrency = None  # no model: every call is a few microseconds

    def __init__(self, labels: str | Path | None = None, *, temperature: float = 0.7,
                 seed: int = 0, bias: str = "", coarse: bool = False):
        self.noise_sd = NOISE_SD_AT_T1 * temperature
        self.confusion = min(1.0, CONFUSION_AT_T1 * temperature)
        self.bias = parse_bias(bias)
        self.seed, self.coarse = seed, coarse
        offsets = "".join(f",{k}{v:+.2f}" for k, v in self.bias.items())
        self.model = (f"{TEACHER_NAME}(sd={self.noise_sd:.3f},confuse={self.confusion:.3f}"
                      f"{offsets}{',coarse' if coarse else ''})")
        self._explicit = read_metadata(labels) if labels else None
        self._found: dict[Path, dict[str, tuple[str, int]]] = {}
        self._asked: Counter[str] = Counter()
        self._lock = threading.Lock()

    def close(self) -> None:
        pass

    def _facts(self, sample: Sample) -> tuple[str, int] | None:
        key = str(Path(sample.image).resolve())
        if self._explicit is not None:
            return self._explicit.get(sample.id) or self._explicit.get(key)
        image = Path(sample.image)
        for folder in (image.parent, image.parent.parent):
            label = folder / LABEL_FILE
            with self._lock:
                if label not in self._found:
                    self._found[label] = read_metadata(label) if label.is_file() else {}
                table = self._found[label]
            facts = table.get(key) or table.get(sample.id)
            if facts:
                return facts
        return None

    def prepare(self, sample: Sample) -> tuple[str, int] | None:
        return self._facts(sample)  # what this teacher "sees": the known distortion and level

    def ask(self, image: tuple[str, int] | None, sample: Sample,
            prompt: TeacherPrompt) -> TeacherReply:
        if image is None:
            raise TeacherError(f"{sample.id}: no distortion/level for this image — the synthetic "
                               "teacher only knows synth_iqa.py sets", "no_metadata")
        distortion, level = image
        with self._lock:
            attempt = self._asked[sample.id]
            self._asked[sample.id] += 1
        rng = random.Random(f"{self.seed}:{sample.id}:{attempt}")
        guided = prompt.user != teacher_prompt("blind").user  # guided prompts show the MOS
        if not guided and rng.random() < self.confusion:
            level = min(5, max(1, level + rng.choice((-1, 1))))  # a misread neighbour level
        seen = coarse_bin(level) if self.coarse and not guided else (level,)
        if len(seen) > 1:  # (no draw otherwise: the fine teacher's answers stay as they were)
            level = rng.choice(seen)  # it cannot tell the bin's levels apart: any one's phrase
        centre = (sample.mos if guided
                  else sum(level_mos(distortion, v) for v in seen) / len(seen)
                  + self.bias.get(distortion, 0.0))
        score = min(5.0, max(1.0, round(centre + rng.gauss(0.0, self.noise_sd), 2)))
        reasoning = (describe(distortion, level, rng) + " "
                     + rng.choice(OVERALL).format(word=quality_word(score)))
        text = format_response(reasoning, score)
        return TeacherReply(text=text, completion_tokens=len(text.split()),
                            finish_reason="stop")
