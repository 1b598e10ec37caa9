"""The toy dataset plugin the tests register in-process (the one ``cirbench.testing`` ships)."""

from cirbench.testing import ToyDataset, ToyDatasetPlugin

ToyPlugin = ToyDatasetPlugin
__all__ = ["ToyDataset", "ToyPlugin"]
