"""The teacher's prompts (versioned) and the check that guided reasoning doesn't leak the MOS.

The teacher gets a longer, more explicit prompt than the student: it is a large model we only
query, so spelling out each quality dimension costs little and makes its reasoning cover them all.
The SFT rows never carry this prompt — the student trains on `qponder_mlx.prompts.USER_PROMPT`,
the prompt it will see at inference time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Bump whenever the wording below changes: rows record it, and a resumed run refuses to mix two.
TEACHER_PROMPT_VERSION = "teacher-v1"
MODES = ("blind", "guided")

TEACHER_SYSTEM_PROMPT = (
    "You are an expert in image quality assessment (IQA). You rate photos the way careful human "
    "observers do in a mean-opinion-score study: you judge technical quality as perceived at a "
    "normal viewing size, not the subject, the aesthetics or the photographer's intent, and you "
    "describe only what is actually visible in the image."
)

_ASPECTS = (
    "Reason step by step, a few concrete sentences per aspect:\n"
    "1. Focus and sharpness: is the main subject in focus; any motion blur, camera shake, "
    "defocus or lens softness?\n"
    "2. Noise: luminance or colour noise and grain, especially in shadows and flat areas.\n"
    "3. Exposure and dynamic range: under- or over-exposure, clipped highlights, crushed "
    "shadows, flat or harsh contrast.\n"
    "4. Colour: white balance, colour casts, saturation, banding.\n"
    "5. Compression and other artifacts: JPEG blocking, ringing, mosquito noise, over-sharpening "
    "halos, aliasing, processing or stitching errors.\n"
    "6. Composition: framing, tilt and clutter, only as far as they lower perceived quality.\n"
    "Then weigh the aspects into one overall score from 1 to 5 with two decimals "
    "(1 bad, 2 poor, 3 fair, 4 good, 5 excellent).\n"
)

_FORMAT = (
    "Reply exactly as <think>your reasoning</think><answer>X.XX</answer> and nothing else: "
    "no text outside the two tags, no other tags inside them."
)

BLIND_USER_PROMPT = "Assess the technical quality of this photo.\n" + _ASPECTS + _FORMAT

GUIDED_USER_PROMPT = (
    "Human observers rated the technical quality of this photo {mos:.2f} on a scale from 1 (bad) "
    "to 5 (excellent). Explain what in the image leads to this rating.\n"
    + _ASPECTS
    + "Write the reasoning as your own independent assessment of the image: do not mention the "
    "observers, their rating or that a rating was given. Your final score should agree with "
    "their rating.\n" + _FORMAT
)


@dataclass(frozen=True)
class TeacherPrompt:
    system: str
    user: str
    version: str = TEACHER_PROMPT_VERSION


def teacher_prompt(mode: str, mos: float | None = None) -> TeacherPrompt:
    """The prompt for one sample: `blind` never shows the MOS, `guided` shows it on 1–5."""
    if mode == "blind":
        return TeacherPrompt(TEACHER_SYSTEM_PROMPT, BLIND_USER_PROMPT)
    if mode == "guided":
        if mos is None:
            raise ValueError("guided mode needs the sample's MOS")
        return TeacherPrompt(TEACHER_SYSTEM_PROMPT, GUIDED_USER_PROMPT.format(mos=mos))
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


# A guided teacher sometimes writes "the given MOS of 3.4 reflects…". The student never sees a
# MOS, so training on such text would teach it to cite a number it was not given.
_LEAK_RE = re.compile(
    r"\bMOS\b|(?i:mean[- ]opinion[- ]score|\bobservers?\b|\braters?\b|\bratings? (?:was |were )?"
    r"(?:given|provided)\b|\b(?:given|provided|reference|target) (?:rating|score)\b"
    r"|ground[- ]truth)"
)


def leaks_reference(reasoning: str | None) -> bool:
    """True if the reasoning refers to the human rating it was shown (guided mode only)."""
    return bool(reasoning) and _LEAK_RE.search(reasoning) is not None
