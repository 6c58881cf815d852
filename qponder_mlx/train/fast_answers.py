"""Cold-start rows for fast mode: the same image and prompt, answered with an empty reasoning.

Fast mode (`scoring`, `mode="fast"`) writes `<think></think><answer>` after the prompt and reads
the leading digit's probabilities. A model trained only to reason first has never seen that
prefix, so fast mode asks it something out of distribution. With `SFTConfig.fast_share = s`,
a seeded share s of the rows is also trained as a fast answer — `<think></think><answer>4
</answer>`, the row's own score rounded to a whole level — so both of the scorer's prompts are
ones the model learned. Whole levels because fast mode reads E[leading digit]: trained on
levels (as Q-Align trains its rating levels, arXiv 2312.17090), that expectation lands between
them where the model is unsure, while a trained "3.72" would put the leading digit's mass on 3
and read ~3.0. Measured on the CPU miniature, three seeds, 405 held-out views
(`experiments/miniature/reproduce.py --config experiments/miniature/configs/fast_levels.toml
--sft-only --seed N`, share 0.10): fast MAE 1.18x reason mode's, fast SRCC 0.943 (reason 0.926).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace

from qponder_mlx.prompts import ANSWER_CLOSE, FAST_ANSWER_PREFIX, answer_number_span
from qponder_mlx.train.sft_rows import IM_END, SFTRow

FAST_SUFFIX = "#fast"  # appended to a fast copy's row id


def chosen(row_id: str, share: float, seed: int) -> bool:
    """Whether a row gets a fast copy: a hash of (seed, id), so the choice does not depend on
    the rows' order in the file."""
    digest = hashlib.sha256(f"{seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def whole_level(number: float) -> int:
    """The score rounded half up to a level 1–5 (2.5 -> 3)."""
    return min(5, max(1, math.floor(number + 0.5)))


def fast_copy(row: SFTRow, tokenizer) -> SFTRow | None:
    """`row` answered as fast mode answers, with the whole level of the number the row's answer
    writes (None when the answer has no well-formed number)."""
    text = tokenizer.decode(row.answer_ids)
    span = answer_number_span(text, "number")
    if span is None:
        return None
    level = whole_level(float(text[span[0]:span[1]]))
    answer = f"{FAST_ANSWER_PREFIX}{level}{ANSWER_CLOSE}{IM_END}"
    p_ids = tokenizer.encode(row.prompt, add_special_tokens=False)
    f_ids = tokenizer.encode(row.prompt + answer, add_special_tokens=False)
    if f_ids[:len(p_ids)] != p_ids:  # the same check as for the row itself
        return None
    ids = f_ids[len(p_ids):]
    return replace(row, id=row.id + FAST_SUFFIX, answer_ids=ids,
                   length=row.length - len(row.answer_ids) + len(ids))


def with_fast_answers(rows: list[SFTRow], tokenizer, share: float, seed: int) -> list[SFTRow]:
    """`rows` plus a fast copy of the chosen share of them."""
    if share <= 0:
        return rows
    extra = [fast_copy(r, tokenizer) for r in rows if chosen(r.id, share, seed)]
    return rows + [r for r in extra if r is not None]
