"""Fine-tuning on the platform: datasets (JSONL validation), and later files, jobs, the trainer."""
