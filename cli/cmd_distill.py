"""`qponder distill`: build the cold-start SFT set from a teacher VLM (see docs/distill.md)."""

from __future__ import annotations

from pathlib import Path

import typer
from qponder_mlx.cli.common import check_at_least, fail, read_samples, writing

from qponder_mlx.safe_paths import shown


def register(app: typer.Typer) -> None:
    app.command("distill")(distill)


def distill(
    data: Path = typer.Option(..., help="Label file (any format `load_labels` reads)."),
    out: Path = typer.Option(..., help="Kept rows (SFT JSONL); rejected/failed rows go to "
                             "<out>.rejected.jsonl, the summary to <out>.summary.json."),
    teacher: str | None = typer.Option(None, help="openai (any OpenAI-compatible server), "
                                       "or local (an MLX model in this process).",
                                       show_default="openai"),
    teacher_url: str | None = typer.Option(None, help="Base URL, e.g. http://127.0.0.1:8000/v1 "
                                           "(openai)."),
    teacher_model: str | None = typer.Option(None, help="Model name the server serves (openai), "
                                             "or repo id / folder (local)."),
    api_key_env: str | None = typer.Option(None, help="NAME of the environment variable that "
                                           "holds the API key (the key is never a flag)."),
    adapter: str | None = typer.Option(None, "--adapter", "--adapter-path",
                                       help="LoRA adapter folder (local)."),
    mode: str | None = typer.Option(None, help="blind (teacher never sees the MOS) or guided "
                                    "(teacher is told the MOS and explains it).",
                                    show_default="blind"),
    max_score_error: float | None = typer.Option(None, help="Keep iff |teacher - MOS| <= this "
                                                 "(1-5 scale).", show_default="0.5"),
    samples_per_image: int | None = typer.Option(None, help="Answers per image; the closest "
                                                 "agreeing one is kept.", show_default="1"),
    concurrency: int | None = typer.Option(None, help="Requests in flight.", show_default="8"),
    temperature: float | None = typer.Option(None, help="Teacher sampling temperature.",
                                             show_default="0.7"),
    max_tokens: int | None = typer.Option(None, help="Teacher token budget.",
                                          show_default="1024"),
    max_pixels: int | None = typer.Option(None, help="Downscale images to at most this many "
                                          "pixels.", show_default="1003520"),
    timeout_s: float | None = typer.Option(None, "--timeout", help="Seconds per request.",
                                           show_default="120.0"),
    max_retries: int | None = typer.Option(None, help="Retries per request on timeouts, dropped "
                                           "connections, 429 and 5xx.", show_default="4"),
    config: Path | None = typer.Option(None, help="TOML file with these settings (a distill "
                                       "table, or top-level keys); flags override it."),
    images_root: Path | None = typer.Option(None, help="Folder the label paths are relative to."),
    format: str = typer.Option("auto", help="Label format (auto, koniq, kadid, livec, ...)."),
    mos_range: str | None = typer.Option(None, help="Native MOS range LO,HI (overrides)."),
    limit: int | None = typer.Option(None, help="Only the first N samples."),
    retry_failed: bool = typer.Option(False, help="Ask again for samples that failed (network, "
                                      "HTTP errors) in an earlier run."),
) -> None:
    """Ask a teacher VLM to reason about each labelled image; keep answers that agree with MOS.

    Rerunning the same command resumes: finished ids are skipped.

    Example: qponder distill --data labels.jsonl --out sft.jsonl --teacher-url http://host:8000/v1
    """
    from qponder_mlx.distill import (
        DistillConfig,
        DistillError,
        build_teacher,
        headline,
        run_distill,
    )

    flags = {"teacher": teacher, "teacher_url": teacher_url, "teacher_model": teacher_model,
             "api_key_env": api_key_env, "adapter": adapter, "mode": mode,
             "max_score_error": max_score_error, "samples_per_image": samples_per_image,
             "concurrency": concurrency, "temperature": temperature,
             "max_tokens": max_tokens, "max_pixels": max_pixels,
             "timeout_s": timeout_s, "max_retries": max_retries}
    try:
        cfg = DistillConfig.from_toml(config) if config else DistillConfig()
        for name, value in flags.items():
            if value is not None:
                setattr(cfg, name, value)
        cfg.validate()
    except ValueError as e:
        fail(str(e))

    check_at_least(limit=(limit, 1))
    if out.resolve() == data.resolve():
        fail(f"--out {shown(out)} is the label file (--data) — writing it would destroy it; "
             "pick another file name")
    samples, problems = read_samples(data, format=format, images_root=images_root,
                                     mos_range=mos_range, limit=limit)

    from qponder_mlx.distill.distill_job import check_outputs

    try:
        check_outputs(out, samples)  # before a local teacher spends a model load
    except DistillError as e:
        fail(str(e))
    try:
        tutor = build_teacher(cfg)
    except ValueError as e:  # missing key variable, bad settings
        fail(str(e))
    except Exception as e:  # noqa: BLE001 — model load errors (local) become one line
        fail(f"cannot start the {cfg.teacher} teacher: {e}")
    try:
        with writing("--out", out, safe=f"every sample finished before is in {shown(out)} and "
                     "its .rejected.jsonl", resume="fix that and rerun the same command to "
                     "resume (finished samples are skipped)"):
            result = run_distill(samples, tutor, cfg, out, retry_failed=retry_failed)
    except DistillError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail(f"interrupted — finished samples are in {shown(out)}; rerun the same command to "
             "resume",
             code=130)
    finally:
        tutor.close()
    if result.skipped:
        typer.echo(f"resumed: {result.skipped} of {len(samples)} samples were already done")
    new = result.new
    typer.echo(f"this run: kept {new['kept']}, rejected {new['rejected']}, failed "
               f"{new['failed']}")
    typer.echo(headline(result.summary))
    # Name only files that exist: `kept: FILE` for a file never written would make the next
    # command's "no such file" a surprise.
    for label, path in (("kept", result.out), ("rejected/failed", result.rejected)):
        typer.echo(f"{label}: {shown(path)}" if path.exists() else f"{label}: 0 — nothing written")
    typer.echo(f"summary: {shown(result.summary_path)}")
