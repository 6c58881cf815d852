"""Training: SFT (this package) and the pieces GRPO reuses — typed configs (`config`), LoRA /
QLoRA in mlx-vlm's adapter format (`lora`), atomic resumable checkpoints (`checkpoint`), metrics
and curves (`runlog`), the shared loop helpers (`loop`) and the SFT rows (`sft_rows`)."""
