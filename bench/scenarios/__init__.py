"""One module per scenario of the suite (see bench/core.py for what each provides)."""
