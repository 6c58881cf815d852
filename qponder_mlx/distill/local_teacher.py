"""Teacher backend: an MLX VLM in this process (e.g. a 4-bit Qwen2.5-VL-72B on a large Mac).

It decodes with `qponder_mlx.generate` — the same prefill/decode the scorer uses — one request at
a time: MLX evaluates on one device, so concurrent calls would only queue, and its graph
building is not meant to be shared between threads.
"""

from __future__ import annotations

import threading
from pathlib import Path

from PIL import Image

from qponder_mlx import generate as gen
from qponder_mlx.distill.teacher_prompts import TeacherPrompt
from qponder_mlx.distill.teachers import TeacherError, TeacherReply
from qponder_mlx.images import PixelPolicy, load_image
from qponder_mlx.labels import Sample
from qponder_mlx.model import LoadedModel, load_model
from qponder_mlx.prompts import chat_messages


class LocalTeacher:
    """`Teacher` running a loaded mlx-vlm model in-process."""

    max_concurrency = 1

    def __init__(self, loaded: LoadedModel, *, sampling: gen.SamplingConfig | None = None,
                 pixels: PixelPolicy | None = None):
        self.loaded = loaded
        self.sampling = sampling or gen.SamplingConfig(max_tokens=1024, temperature=0.7)
        self.pixels = pixels or PixelPolicy(max_pixels=1280 * 28 * 28)
        self.model = loaded.source + (f"+{loaded.adapter}" if loaded.adapter else "")
        self._stops = gen.stop_tokens(loaded.model, loaded.tokenizer)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model: str, adapter: str | Path | None = None, **kwargs) -> LocalTeacher:
        return cls(load_model(model, adapter), **kwargs)

    def close(self) -> None:
        pass

    def prepare(self, sample: Sample) -> Image.Image:
        return self.pixels.resize(load_image(sample.image), name=str(sample.image))

    def ask(self, image: Image.Image, sample: Sample, prompt: TeacherPrompt) -> TeacherReply:
        m, proc = self.loaded.model, self.loaded.processor
        text = self.loaded.tokenizer.apply_chat_template(
            chat_messages(prompt.user, prompt.system), tokenize=False, add_generation_prompt=True)
        with self._lock:
            try:
                pre = gen.prefill(m, gen.encode(proc, [text], [image]))
                comp = gen.decode(m, pre, self.sampling, self._stops)
                gen.detokenize(self.loaded.tokenizer, comp, self._stops)
            except Exception as e:  # noqa: BLE001 — one sample's model failure is recorded
                raise TeacherError(f"model failed: {type(e).__name__}: {e}", "model") from None
        c = comp[0]
        return TeacherReply(text=c.text, prompt_tokens=pre.prompt_len,
                            completion_tokens=len(c.token_ids), finish_reason=c.finish_reason)
