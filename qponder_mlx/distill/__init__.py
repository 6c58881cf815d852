"""Teacher distillation: build the cold-start SFT set from a large VLM's reasoning.

`run_distill(samples, build_teacher(config), config, "distill.jsonl")` asks a teacher (an
OpenAI-compatible endpoint or an in-process MLX model) to reason about each labelled image and
keeps the answers whose score agrees with the human MOS. See docs/distill.md.

Adding a backend: one file with a class that satisfies `Teacher` (teachers.py), plus a branch in
`config.build_teacher`.
"""

from qponder_mlx.distill.config import DistillConfig, build_teacher, read_api_key
from qponder_mlx.distill.distill_job import (
    DistillError,
    RunResult,
    distill_sample,
    run_distill,
    sibling,
)
from qponder_mlx.distill.retry import RetryPolicy, call_with_retries, parse_retry_after
from qponder_mlx.distill.summary import headline, summarize
from qponder_mlx.distill.teacher_prompts import (
    TEACHER_PROMPT_VERSION,
    TeacherPrompt,
    leaks_reference,
    teacher_prompt,
)
from qponder_mlx.distill.teachers import (
    FatalTeacherError,
    Teacher,
    TeacherError,
    TeacherReply,
    TransientTeacherError,
)

__all__ = [
    "TEACHER_PROMPT_VERSION", "DistillConfig", "DistillError", "FatalTeacherError",
    "RetryPolicy", "RunResult", "Teacher", "TeacherError", "TeacherPrompt", "TeacherReply",
    "TransientTeacherError", "build_teacher", "call_with_retries", "distill_sample", "headline",
    "leaks_reference", "parse_retry_after", "read_api_key", "run_distill", "sibling",
    "summarize", "teacher_prompt",
]
