"""qponder-mlx: train, run and ship reasoning image-quality models with MLX."""

__version__ = "0.1.0"
__all__ = ["Scorer", "__version__"]


def __getattr__(name: str):
    # Lazy: `import qponder_mlx` stays cheap (no MLX/mlx-vlm import) until Scorer is used.
    if name == "Scorer":
        from qponder_mlx.scoring import Scorer

        return Scorer
    raise AttributeError(f"module 'qponder_mlx' has no attribute {name!r}")
