"""Compatibility with earlier releases under this package name.

- :mod:`yet_another_retnet.compat.yar051`: yet-another-retnet 0.5.1's ``RetNet`` API and
  checkpoints (also importable as :mod:`yet_another_retnet.retnet`, its 0.5.1 path).
"""
