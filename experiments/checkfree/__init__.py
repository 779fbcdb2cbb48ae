"""CheckFree / CheckFree+ reproduction at small scale: ``python -m experiments.checkfree.run --quick``."""
