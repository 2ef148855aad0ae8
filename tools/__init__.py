"""The command lines other than sample.py and train.py, each run from the repository root as
`python -m tools.NAME` (README, "Layout")."""
