"""sfd-fast: a fast, exact training engine for Score Forgetting Distillation (SFD).

Importing the package touches no CUDA and imports no optional accelerator (Triton, xformers,
bitsandbytes, DeepSpeed); those load when a config asks for them.
"""
__version__ = "0.1.0"
