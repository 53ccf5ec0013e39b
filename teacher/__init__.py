"""How the bundled tiny teacher (checkpoints/teacher) was trained: train.py and grounding.py.

Not part of mmMamba, which starts from a trained HoVLE; kept out of the top-level files so that
those are the paper. Run `python -m teacher.train` from the repository root."""
