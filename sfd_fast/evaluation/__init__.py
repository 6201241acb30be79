"""Evaluation: unlearning accuracy, Frechet distance, sample grids."""
