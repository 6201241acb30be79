"""Model loading: Stable Diffusion components and a tiny random SD pipeline for tests."""
