"""The `moe-serve` command line."""
