"""On-device bundles: fused, quantized, verified model folders (see docs/export.md)."""
