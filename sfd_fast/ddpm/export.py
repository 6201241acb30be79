"""`python -m sfd_fast.ddpm.export --format reference-ddpm --run D --out ckpt.pth` (see sample.py)."""
from .sample import export_main

if __name__ == "__main__":
    raise SystemExit(export_main())
