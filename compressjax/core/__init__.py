"""Core types: compressed leaves, formats protocol, rules, tree utilities."""

from compressjax.core.base import (CompressedLeaf, LEAF_TYPES, Stage,
                                   compress_inside, inner_arrays, materialize)
from compressjax.core.codebook import CodebookArray
from compressjax.core.contraction import MatrixLayout, default_contract
from compressjax.core.errors import CompressionError, TreeMismatchError
from compressjax.core.format import Capabilities, Format, KernelDecode
from compressjax.core.input_transform import InputTransform
from compressjax.core.lowrank import LowRank
from compressjax.core.pact_input import PactInput
from compressjax.core.qarray import QArray
from compressjax.core.rules import Plan, Rule, default_filter, resolve
from compressjax.core.sparse import NMSparseArray, SparseArray
from compressjax.core.tree import (combine, is_compressed, leaves_with_paths,
                                   materialize_tree, partition_float, path_str)

__all__ = [
    "Capabilities", "CodebookArray", "CompressedLeaf", "Format",
    "KernelDecode", "LEAF_TYPES", "MatrixLayout", "materialize",
    "CompressionError", "TreeMismatchError", "InputTransform", "LowRank",
    "PactInput", "QArray", "Plan", "Rule", "Stage", "compress_inside",
    "default_contract", "default_filter", "inner_arrays", "resolve",
    "NMSparseArray", "SparseArray", "combine", "is_compressed",
    "leaves_with_paths", "materialize_tree", "partition_float", "path_str",
]
