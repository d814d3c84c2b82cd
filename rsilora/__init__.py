"""rsilora: LoRA fine-tuning and Ray Tune search for InstructBLIP on remote-sensing captions."""

__version__ = "0.1.0"
