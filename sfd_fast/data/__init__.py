"""Prompt data: prompt-file readers, forget/remain prompt sets and context dropout."""
