"""Hydra config groups, installed as the package ``mpistyle.configs`` (see setup.cfg)."""
