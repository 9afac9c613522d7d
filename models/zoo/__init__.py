"""The shipped, trained model packages: one digits-<block>/ directory per attention block."""
