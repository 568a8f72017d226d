"""LoRA Studio: fine-tune language models with LoRA and watch what happens while it happens."""

__version__ = "0.1.0"
