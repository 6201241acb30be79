from setuptools import setup

# torch is deliberately not pinned to a build here: the Makefile installs the CPU build on machines
# without a GPU before installing this package (a bare `pip install torch` pulls a multi-GB CUDA build).
setup(
    name="sfd-fast",
    version="0.1.0",
    description="Fast Score Forgetting Distillation: data-free unlearning + one-step distillation of diffusion models",
    python_requires=">=3.11",
    packages=["sfd_fast", "sfd_fast.engine", "sfd_fast.digits", "sfd_fast.sd", "sfd_fast.ddpm", "sfd_fast.compat",
              "sfd_fast.evaluation", "sfd_fast.kernels"],
    # Lower bounds: the oldest versions the "oldest" environment of `make test-matrix` passes with
    # (docs/install.md); exact versions come from the lock (requirements/), not from here. transformers
    # 4.56: from_pretrained(dtype=...) (sd/loading.py); 4.46 failed every Stable Diffusion test. triton
    # 3.6 (the device image's): 3.1 failed every interpreter test of kernels/sfd_loss.py.
    install_requires=["torch>=2.11", "diffusers>=0.31", "transformers>=4.56", "safetensors>=0.4.5", "numpy>=1.26",
                      "scipy>=1.12", "scikit-learn>=1.5", "tqdm>=4.66", "pillow>=10.4", "pyyaml>=6.0.1",
                      "matplotlib>=3.8"],
    extras_require={
        "gpu": ["triton>=3.6", "xformers", "bitsandbytes>=0.50.2", "nvidia-ml-py"],
        "dist": ["deepspeed>=0.19.8"],
        # FID / Inception Score of ddpm runs (sfd_fast/evaluation/fid.py): torchmetrics' metrics on our own
        # Inception port, so neither torch-fidelity nor torchvision (whose wheels pin a CUDA torch) is needed
        "eval": ["torchmetrics>=1.9.0"],
        # experiment trackers (log.trackers, sfd_fast/trackers.py)
        "tensorboard": ["tensorboard>=2.21.0"],
        "wandb": ["wandb>=0.31.0"],
        "test": ["pytest>=8.0", "pytest-benchmark>=4.0", "triton>=3.6", "deepspeed>=0.19.8", "bitsandbytes>=0.50.2",
                 "torchmetrics>=1.9.0", "tensorboard>=2.21.0", "wandb>=0.31.0"],
    },
    entry_points={"console_scripts": ["sfd-fast=sfd_fast.cli:main"]},
)
