"""Core types: compressed leaves, formats protocol, rules, tree utilities."""

from compressjax.core.base import CompressedLeaf, LEAF_TYPES, materialize
from compressjax.core.codebook import CodebookArray
from compressjax.core.errors import CompressionError, TreeMismatchError
from compressjax.core.input_transform import InputTransform
from compressjax.core.lowrank import LowRank
from compressjax.core.qarray import QArray
from compressjax.core.rules import Plan, Rule, default_filter, resolve
from compressjax.core.sparse import NMSparseArray, SparseArray
from compressjax.core.tree import (combine, is_compressed, leaves_with_paths,
                                   materialize_tree, partition_float, path_str)

__all__ = [
    "CodebookArray", "CompressedLeaf", "LEAF_TYPES", "materialize", "CompressionError",
    "TreeMismatchError", "InputTransform", "LowRank", "QArray", "Plan", "Rule", "default_filter",
    "resolve", "NMSparseArray", "SparseArray", "combine", "is_compressed",
    "leaves_with_paths", "materialize_tree", "partition_float", "path_str",
]
