"""revjepa: step-based GPT-2 + JEPA training and evaluation for the reversal curse."""

__version__ = "0.1.0"
