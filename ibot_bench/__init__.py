"""ibot-bench: evaluation suite for pretrained vision encoders, with iBOT pretraining."""

__version__ = "0.1.0"
