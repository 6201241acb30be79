"""Drop-in functions with the signatures of the reference SFD/SiD codebases (spec §6)."""
