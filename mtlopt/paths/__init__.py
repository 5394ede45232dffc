"""The backward paths of :class:`~mtlopt.MTLOptimizer`, one module each, on a shared base."""

from .base import PathBase
from .jacobian import JacobianPath
from .representation import RepresentationPath
from .scalarized import ScalarizedPath

__all__ = ["JacobianPath", "PathBase", "RepresentationPath", "ScalarizedPath"]
