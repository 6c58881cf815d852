"""Make, load and describe a bundle: a fused, quantized, verified MLX model folder.

    load base (+ adapter)  ->  score calibration set (reference)
    fuse LoRA, quantize    ->  write a stock MLX folder into a temp folder beside --out
    load it back (stock)   ->  score again, compare  ->  checksums + qponder.json  ->  rename

The folder is what `mlx_vlm.load`, `mlx_vlm.server` and MLX Swift's VLM loader read: config.json
(with `quantization`), model.safetensors (+ index), tokenizer, processor configs and chat
template, copied from the base. Only safetensors are written; nothing is pickled.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import mlx.core as mx

from qponder_mlx.images import PixelPolicy
from qponder_mlx.io import atomic_write_json
from qponder_mlx.model import LoadedModel, ModelLoadError, load_model, resolve_model_path
from qponder_mlx.prompts import PROMPT_VERSION

from . import agreement as agree
from . import golden as gold
from . import resize_parity, swift_compat
from .app_contract import preprocessing_section, tokens_section
from .config import ExportConfig
from .fuse import fuse_lora
from .manifest import (
    FORMAT,
    FORMAT_VERSION,
    file_table,
    generation_section,
    pixels_section,
    prompt_section,
    response_section,
    sha256_file,
    weights_digest,
    write_manifest,
)
from .quantize import quantize_for_bundle
from .staging import check_destination, staged_folder
from .verify import BundleError, VerifyResult, read_manifest, verify_bundle

# Copied from the base folder as they are: tokenizer, processor configs, chat template,
# generation config. An allowlist, so pickles (*.bin, *.pt), remote code (*.py) and the base's
# own weights or index never reach a bundle.
SIDE_FILE_PATTERNS = ("*.json", "*.txt", "*.jinja", "*.model", "*.tiktoken")
NOT_COPIED = {"config.json", "model.safetensors.index.json", "adapter_config.json",
              "qponder.json"}


@dataclass
class ExportResult:
    out: Path
    manifest: dict
    seconds: float


def _adapter_folder(adapter: str | None) -> Path | None:
    if adapter is None:
        return None
    p = Path(adapter).expanduser().resolve()
    if not (p / "adapter_config.json").is_file() or not (p / "adapters.safetensors").is_file():
        raise ModelLoadError(f"{p}: needs adapters.safetensors and adapter_config.json — pass "
                             "the folder a training run wrote (run/adapters)")
    return p


def _refuse_overlap(out: Path, *sources: Path | None) -> None:
    # --force deletes the old --out: it must never be (or contain) what we read from.
    o = out.resolve()
    for src in filter(None, sources):
        s = src.resolve()
        if o == s or o in s.parents:
            raise ModelLoadError(f"{out}: --out would overwrite the input {src} — choose "
                                 "another folder")


def base_identity(path: Path) -> dict:
    """Repo id and commit for a Hugging Face cache snapshot; the folder name otherwise."""
    parts = path.parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        repo = parts[-3][len("models--"):].replace("--", "/")
        return {"id": repo, "revision": parts[-1], "source": "huggingface"}
    # Only the folder's name: an absolute path would leak the exporter's file system into a
    # manifest that ships inside an app.
    return {"id": path.name, "revision": None, "source": "local folder"}


def _adapter_section(adapter: Path | None, fused: list[str]) -> dict | None:
    if adapter is None:
        return None
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    lora = cfg.get("lora_parameters", {})
    return {
        "sha256": sha256_file(adapter / "adapters.safetensors"),
        "config_sha256": sha256_file(adapter / "adapter_config.json"),
        "fine_tune_type": cfg.get("fine_tune_type", "lora"),
        "rank": lora.get("rank"), "scale": lora.get("scale"),
        "trained_on_quantized_base": bool(cfg.get("base_quantization")),
        "layers_fused": len(fused),
    }


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for pattern in SIDE_FILE_PATTERNS:
        for f in sorted(src.glob(pattern)):
            if f.is_file() and f.name not in NOT_COPIED and not (dst / f.name).exists():
                shutil.copyfile(f, dst / f.name)  # follows HF-cache symlinks to the blobs
                copied.append(f.name)
    return copied


def _require_loadable_layout(folder: Path) -> None:
    """What a loader without network access needs; refuse a bundle that would call the hub."""
    names = {p.name for p in folder.iterdir()}
    need = [("preprocessor_config.json",), ("tokenizer_config.json",),
            ("tokenizer.json", "vocab.json")]
    for options in need:
        if not names.intersection(options):
            raise BundleError(f"the base model folder has no {' or '.join(options)} — the "
                              "bundle would need the hub to load; export from a complete model "
                              "folder")
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    if not ({"chat_template.json", "chat_template.jinja"} & names or "chat_template" in tok_cfg):
        raise BundleError("the base model folder has no chat template — the app could not "
                          "render the prompt; export from a complete model folder")


def _apply_pixel_policy(folder: Path, pixels: PixelPolicy) -> None:
    """Write the pixel budget into preprocessor_config.json.

    Stock loaders (mlx-vlm, its server, MLX Swift's Qwen processor) resize by these fields; with
    the base's values (Qwen: up to 16384 image tokens) a plain `mlx_vlm.server` would feed far
    larger images than the model was trained and evaluated on.
    """
    path = folder / "preprocessor_config.json"
    cfg = json.loads(path.read_text())
    cfg["min_pixels"], cfg["max_pixels"] = pixels.min_pixels, pixels.max_pixels
    size = cfg.get("size")
    if isinstance(size, dict) and {"shortest_edge", "longest_edge"} & set(size):
        # transformers' newer spelling of the same two numbers
        cfg["size"] = {**size, "shortest_edge": pixels.min_pixels,
                       "longest_edge": pixels.max_pixels}
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def _weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _release_memory() -> None:
    # Called after the caller dropped its last reference to a model, so that the next model
    # does not share the machine with the previous one.
    gc.collect()
    mx.clear_cache()


def _version() -> str:
    try:
        return metadata.version("qponder-mlx")
    except metadata.PackageNotFoundError:
        return "unknown"


def _write_model(model, config: dict, base: Path, out: Path, pixels: PixelPolicy) -> None:
    from mlx_vlm.utils import save_config, save_weights

    save_weights(out, model)
    save_config(config, config_path=out / "config.json")
    _copy_side_files(base, out)
    _require_loadable_layout(out)
    _apply_pixel_policy(out, pixels)


def _write_golden(bundled: LoadedModel, folder: Path, pixels: PixelPolicy) -> dict:
    doc = gold.compute(bundled, pixels)
    (folder / gold.GOLDEN_DIR).mkdir()
    for name in gold.GOLDEN_IMAGES:
        shutil.copyfile(gold.ASSETS / name, folder / gold.GOLDEN_DIR / name)
    atomic_write_json(folder / gold.GOLDEN_FILE, doc)
    return doc


def _golden_section(doc: dict) -> dict:
    return {"file": gold.GOLDEN_FILE, "images": [e["image"] for e in doc["images"]],
            "reason_tokens": gold.REASON_TOKENS, "tolerance": doc["tolerance"],
            "computed_with": doc["computed_with"],
            "check": "qponder bundle verify recomputes them; an app self-tests against them "
                     "(docs/export.md)"}


def _swift_section(cfg: ExportConfig, quant: dict) -> dict:
    src = swift_compat.SWIFT_SOURCE
    if cfg.target != "mlx-swift":
        return {"target": cfg.target, "check": "skipped (--target python)"}
    return {"target": "mlx-swift", "check": "passed",
            "requires": f"{src['repo']} ({src['library']}) >= {src['min_version']}",
            "checked_against": {"repo": src["repo"], "tag": src["min_version"],
                                "commit": src["commit"], "files": src["files"]},
            "not_verified_in_mlx_swift": swift_compat.unverified(
                quant.get("spec"), bool(quant.get("quantize_vision"))),
            "compiled": False}


def export_bundle(cfg: ExportConfig, *, progress: bool = True,
                  log: Callable[[str], None] = lambda _: None) -> ExportResult:
    """Fuse, quantize, check and write the bundle at `cfg.out` (see the module docstring)."""
    t0 = time.perf_counter()
    cfg.validate()
    spec, pixels = cfg.quant_spec(), cfg.pixels()
    out = Path(cfg.out).expanduser().absolute()
    base = resolve_model_path(cfg.model)
    adapter = _adapter_folder(cfg.adapter)
    _refuse_overlap(out, base, adapter)
    check_destination(out, cfg.force)  # before minutes of work, not after
    calib = agree.load_calibration(cfg.calibration, cfg.calibration_limit) \
        if cfg.agreement else None
    base_config = json.loads((base / "config.json").read_text())
    if cfg.target == "mlx-swift":  # the base's own keys, before minutes of work
        pp = base / "preprocessor_config.json"
        swift_compat.refuse(swift_compat.check_base(
            base_config, json.loads(pp.read_text()) if pp.is_file() else None))

    log(f"loading {cfg.model}" + (f" + adapter {adapter}" if adapter else ""))
    ref = load_model(cfg.model, adapter)
    ref_run = agree.run_model(ref, calib, cfg, "reference", progress=progress) if calib else None
    ref_bytes = _weights_bytes(base) + (
        (adapter / "adapters.safetensors").stat().st_size if adapter else 0)

    with staged_folder(out, force=cfg.force) as tmp:
        model = ref.model
        fused = fuse_lora(model)
        log(f"fused {len(fused)} LoRA layers" if fused else "no adapter: nothing to fuse")
        config, qreport = quantize_for_bundle(model, base_config, spec)
        log(f"quantized {qreport.layers_quantized} layers ({qreport.layers_float} left float), "
            f"{qreport.bits_per_weight:.2f} bits per weight overall")
        _write_model(model, config, base, tmp, pixels)
        del model, ref
        _release_memory()
        if cfg.target == "mlx-swift":
            swift_compat.refuse_unless_loadable(tmp)
            log("MLX Swift check passed (mlx-swift-lm >= "
                f"{swift_compat.SWIFT_SOURCE['min_version']} requirements)")

        mx.reset_peak_memory()
        bundled = load_model(str(tmp))
        agreement = None
        if calib is not None:
            bundle_run = agree.run_model(bundled, calib, cfg, "bundle", progress=progress)
            agreement = agree.compare(ref_run, bundle_run, calib, cfg)
            agreement["peak_memory_bytes_bundle"] = mx.get_peak_memory()
            resize_tolerance = {
                **resize_parity.measure(bundled, calib.images, pixels, calib.mos,
                                        cfg.batch_size),
                "meaning": "fast scores of this bundle on the calibration set with the photo "
                           "resized other ways than qponder's (the reference) to the same size; "
                           "an app that resizes otherwise should expect differences this size",
                "calibration": calib.file.name}
        else:
            resize_tolerance = None
        tokens = tokens_section(bundled)
        golden = _write_golden(bundled, tmp, pixels)
        log(f"golden vectors: {len(golden['images'])} images in {gold.GOLDEN_FILE}")
        del bundled
        _release_memory()

        files = file_table(tmp)
        size = sum(f["size"] for f in files.values())
        if agreement is not None:
            agreement["size_bytes"] = {"reference_weights": ref_bytes, "bundle": size}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_by": f"qponder-mlx {_version()}",
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model_type": base_config.get("model_type"),
            "prompt": prompt_section(),
            "response": response_section(),
            "generation": generation_section(),
            "tokens": tokens,
            "pixels": {**pixels_section(pixels), "preprocessing": preprocessing_section(
                pixels, json.loads((tmp / "preprocessor_config.json").read_text()))},
            "golden": _golden_section(golden),
            "resize_tolerance": resize_tolerance,
            "mlx_swift": _swift_section(cfg, qreport.to_dict()),
            "base_model": {**base_identity(base),
                           "quantization": base_config.get("quantization")},
            "adapter": _adapter_section(adapter, fused),
            "quantization": qreport.to_dict(),
            "size_bytes": size,
            "agreement": agreement,
            "identity": weights_digest(files)[:16],
            "files": files,
        }
        write_manifest(tmp, manifest)
    log(f"bundle written: {out}")
    return ExportResult(out, manifest, time.perf_counter() - t0)


def load_bundle(path: str | Path, verify: bool = True) -> LoadedModel:
    """Load a bundle with stock mlx-vlm; with `verify` (the default) every checksum first.

    Refuses a tampered, incomplete or foreign bundle (BundleError, one line naming the file),
    and one made with a different prompt than this qponder uses.
    """
    folder = Path(path).expanduser()
    if verify:
        result = verify_bundle(folder)
        result.raise_if_failed()
        manifest = result.manifest
    else:
        manifest = read_manifest(folder, VerifyResult(folder))
    if manifest is not None:
        version = manifest.get("prompt", {}).get("version")
        if version != PROMPT_VERSION:
            raise BundleError(f"{folder}: made for prompt {version!r}, this qponder uses "
                              f"{PROMPT_VERSION!r} — re-export it with this version")
    loaded = load_model(str(folder))
    if manifest is not None:
        loaded.identity = f"bundle-{weights_digest(manifest['files'])[:16]}"
    return loaded


def bundle_info(path: str | Path) -> dict:
    """The manifest (checked against its checksum line, weights not hashed)."""
    folder = Path(path).expanduser()
    result = VerifyResult(folder)
    if not folder.is_dir():
        raise BundleError(f"{folder}: no such folder — pass the bundle folder")
    manifest = read_manifest(folder, result)
    result.raise_if_failed()
    return manifest


def summary_lines(manifest: dict) -> list[str]:
    """A human summary of a manifest for `qponder bundle info`."""
    q = manifest.get("quantization") or {}
    spec = q.get("spec")
    base = manifest.get("base_model", {})
    ad = manifest.get("adapter")
    px = manifest.get("pixels", {})
    lines = [
        f"format      {manifest.get('format')} v{manifest.get('format_version')}, "
        f"created {manifest.get('created_at')} by {manifest.get('created_by')}",
        f"base        {base.get('id')} @ {base.get('revision') or 'local'}",
        "adapter     " + (f"sha256 {ad['sha256'][:16]}…, rank {ad.get('rank')}, "
                          f"{ad.get('layers_fused')} layers fused" if ad else "none"),
        "weights     " + (f"{spec['bits']}-bit {spec['mode']}, group {spec['group_size']}, "
                          f"vision {'quantized' if q.get('quantize_vision') else 'float'}"
                          if spec else "float (not quantized)")
        + f"; {q.get('bits_per_weight')} bits/weight overall, "
          f"{q.get('language_model_bits_per_weight')} in the language model",
        f"size        {manifest.get('size_bytes', 0) / 1e6:.1f} MB in "
        f"{len(manifest.get('files', {}))} files",
        f"prompt      {manifest.get('prompt', {}).get('version')}; pixels "
        f"{px.get('min_pixels')}..{px.get('max_pixels')}",
    ]
    swift = manifest.get("mlx_swift")
    if swift:
        extra = ", not verified there: " + ", ".join(swift["not_verified_in_mlx_swift"]) \
            if swift.get("not_verified_in_mlx_swift") else ""
        lines.append(f"mlx swift   {swift.get('check')}"
                     + (f" ({swift['requires']}){extra}" if swift.get("requires") else ""))
    g = manifest.get("golden")
    lines.append(f"golden      {len(g['images'])} images, {g['reason_tokens']} greedy tokens "
                 f"each ({g['file']})" if g else "golden      none (made before golden vectors)")
    a = manifest.get("agreement")
    if a:
        f, r = a["fast"], a["reason"]
        lines.append(
            f"agreement   {a['calibration']['images']} images ({a['calibration']['file']}): "
            f"SRCC vs reference {f['srcc_bundle_vs_reference']}, mean |Δscore| "
            f"{f['mean_abs_delta']}, max {f['max_abs_delta']}; format rate "
            f"{r['format_rate']['bundle']} (reference {r['format_rate']['reference']}) on "
            f"{r['n']} reasoning answers, identical text {r['same_text_rate']}")
        fr = a.get("fast_vs_reason")  # bundles made before it was measured lack it
        if fr:
            lines.append(f"fast mode   SRCC vs MOS {f['srcc_vs_mos']['bundle']}, MAE "
                         f"{f.get('mae_vs_mos', {}).get('bundle')}; vs its own reasoned scores "
                         f"SRCC {fr['srcc']}, mean |Δ| {fr['mean_abs_delta']} ({fr['n']} photos)")
    else:
        lines.append("agreement   not measured (--no-agreement)")
    return lines
