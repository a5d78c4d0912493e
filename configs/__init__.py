"""The shipped experiment configs (YAML), installed as package data of ``transresnet.configs``."""
