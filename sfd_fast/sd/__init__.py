"""The Stable Diffusion family: loading diffusers folders (or a tiny random pipeline), prompt sets,
the text-embedding cache and the conditioning table of concept forgetting, sampling, the `sample`
and `export` commands."""
