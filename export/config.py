"""What `qponder export` does, as one typed config that a TOML file and CLI flags both fill."""

from __future__ import annotations

from dataclasses import dataclass

from qponder_mlx.images import PixelPolicy
from qponder_mlx.model import DEFAULT_MODEL

Q_MODES = ("affine", "mxfp4")
# "mlx-swift": refuse a bundle MLX Swift's Qwen2.5-VL loader would not load (swift_compat.py);
# "python": mlx-vlm only, no such check.
TARGETS = ("mlx-swift", "python")
AFFINE_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize packs in affine mode
# MLX's defaults per mode (mlx_vlm.quant_utils.QUANTIZATION_MODE_DEFAULTS); mxfp4 allows only
# these: 32-element blocks sharing one 8-bit power-of-two scale, 4-bit floats inside.
MODE_DEFAULTS = {"affine": (64, 4), "mxfp4": (32, 4)}


class ExportConfigError(ValueError):
    """An export setting that cannot be used; the message is one line naming the setting."""


@dataclass(frozen=True)
class QuantSpec:
    """How the bundle's weights are quantized; `None` in place of a QuantSpec means float."""

    bits: int = 4
    group_size: int = 64
    mode: str = "affine"
    quantize_vision: bool = False  # the vision tower stays float unless asked (mlx-vlm's default)

    def params(self) -> dict:
        """The per-layer parameters in the form config.json and nn.QuantizedLinear use."""
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}


@dataclass
class ExportConfig:
    model: str = DEFAULT_MODEL  # repo id or folder; float or already quantized
    adapter: str | None = None  # LoRA folder (adapters.safetensors + adapter_config.json)
    out: str = "bundle"
    quantize: bool = True  # False: fuse only, weights stay float (exact vs the adapter model)
    bits: int = 4
    group_size: int | None = None  # None: the mode's default (affine 64, mxfp4 32)
    q_mode: str = "affine"
    quantize_vision: bool = False
    force: bool = False  # replace a non-empty --out
    target: str = "mlx-swift"  # who must load the bundle: "mlx-swift" (checked) or "python"
    # Agreement report: bundle vs the unfused model, on a labelled calibration set.
    agreement: bool = True
    calibration: str | None = None  # label file; None = the CC0 set shipped with qponder
    calibration_limit: int | None = None  # only the first N images
    reason_images: int = 4  # images that also get a full reasoning answer (format rate)
    reason_max_tokens: int = 128
    batch_size: int = 8
    # The pixel policy recorded in the manifest (what the app should feed) and used for the
    # agreement runs, so the report measures what the app will see.
    min_pixels: int = PixelPolicy.min_pixels
    max_pixels: int = PixelPolicy.max_pixels

    def quant_spec(self) -> QuantSpec | None:
        """The validated quantization settings, or None for a float bundle."""
        if not self.quantize:
            return None
        if self.q_mode not in Q_MODES:
            raise ExportConfigError(f"q_mode {self.q_mode!r}: expected one of {', '.join(Q_MODES)}")
        default_group, default_bits = MODE_DEFAULTS[self.q_mode]
        group = self.group_size or default_group
        if self.q_mode == "affine":
            if self.bits not in AFFINE_BITS:
                raise ExportConfigError(f"bits {self.bits}: affine quantization packs "
                                        f"{', '.join(map(str, AFFINE_BITS))} bits — for float "
                                        "weights use --no-quantize")
            if group not in (32, 64, 128):
                raise ExportConfigError(f"group_size {group}: MLX supports 32, 64 or 128")
        elif (group, self.bits) != (default_group, default_bits):
            raise ExportConfigError(f"{self.q_mode} needs bits {default_bits} and group_size "
                                    f"{default_group}, got bits {self.bits}, group_size {group}")
        return QuantSpec(self.bits, group, self.q_mode, self.quantize_vision)

    def pixels(self) -> PixelPolicy:
        try:
            return PixelPolicy(min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        except ValueError as e:
            raise ExportConfigError(f"min_pixels/max_pixels: {e}") from None

    def validate(self) -> None:
        if self.target not in TARGETS:
            raise ExportConfigError(f"target {self.target!r}: expected one of "
                                    f"{', '.join(TARGETS)}")
        self.quant_spec()
        self.pixels()
        for name in ("reason_images", "batch_size", "reason_max_tokens"):
            low = 0 if name == "reason_images" else 1
            if getattr(self, name) < low:
                raise ExportConfigError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.calibration_limit is not None and self.calibration_limit < 2:
            raise ExportConfigError(f"calibration_limit must be >= 2 (SRCC needs two images), "
                                    f"got {self.calibration_limit}")
