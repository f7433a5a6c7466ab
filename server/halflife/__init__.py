"""Halflife: real-time recommendations from time-decayed transformer interest profiles."""

__version__ = "0.1.0"
