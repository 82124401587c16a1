"""Fine-tuning support for ``lorakit finetune``: data loading, demo data and the training loop."""
