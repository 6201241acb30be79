from setuptools import setup

# torch is deliberately not pinned to a build here: the Makefile installs the CPU build on machines
# without a GPU before installing this package (a bare `pip install torch` pulls a multi-GB CUDA build).
setup(
    name="sfd-fast",
    version="0.1.0",
    description="Fast Score Forgetting Distillation: data-free unlearning + one-step distillation of diffusion models",
    python_requires=">=3.10",
    packages=["sfd_fast", "sfd_fast.engine", "sfd_fast.digits", "sfd_fast.sd", "sfd_fast.ddpm", "sfd_fast.compat",
              "sfd_fast.evaluation", "sfd_fast.kernels"],
    install_requires=["torch>=2.4", "diffusers>=0.30", "transformers>=4.40", "safetensors>=0.4", "numpy",
                      "scipy", "scikit-learn", "tqdm", "pillow", "pyyaml", "matplotlib>=3.5"],
    extras_require={
        "gpu": ["triton", "xformers", "bitsandbytes", "nvidia-ml-py"],
        "dist": ["deepspeed==0.19.8"],
        # FID / Inception Score of ddpm runs (sfd_fast/evaluation/fid.py): torchmetrics' metrics on our own
        # Inception port, so neither torch-fidelity nor torchvision (whose wheels pin a CUDA torch) is needed
        "eval": ["torchmetrics==1.9.0"],
        # experiment trackers (log.trackers, sfd_fast/trackers.py)
        "tensorboard": ["tensorboard==2.21.0"],
        "wandb": ["wandb==0.31.0"],
        "test": ["pytest", "pytest-benchmark", "triton", "deepspeed==0.19.8", "bitsandbytes==0.50.2",
                 "torchmetrics==1.9.0", "tensorboard==2.21.0", "wandb==0.31.0"],
    },
    entry_points={"console_scripts": ["sfd-fast=sfd_fast.cli:main"]},
)
