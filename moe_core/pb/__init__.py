"""Generated from protos/moe/v1 by protos/generate.py. Do not edit."""
