"""Dataset layouts -> Records, image/mask reading, SIIM run-length, split, synthetic data."""

from ptxseg.data.records import Record, RleMask

__all__ = ["Record", "RleMask"]
