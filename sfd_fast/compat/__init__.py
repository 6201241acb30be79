"""Drop-in functions for existing SFD / SiD / SiD-LSG codebases (docs/compat.md).

    sfd_fast.compat.sd           load_sd15, sid_sd_sampler, sid_sd_denoise  (SFD:SD sd_util.py)
    sfd_fast.compat.ddpm         sid_sg_loss_conditional, sid_g_loss_conditional, ...  (SFD:DDPM losses.py)
    sfd_fast.compat.edm          SID_EDMLoss  (SiD training/sid_loss.py)
    sfd_fast.compat.checkpoints  reference pickles -> safetensors / diffusers (trust flag required)

Submodules are imported on use (nothing heavy, no CUDA, at `import sfd_fast.compat`).
"""
