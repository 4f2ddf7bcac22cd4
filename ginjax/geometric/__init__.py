"""Geometric images, MultiImage and invariant filters (the ginjax 0.1.8 geometric API)."""

from ginjax.geometric.constants import *  # noqa: F401,F403
from ginjax.geometric.functional_geometric_image import *  # noqa: F401,F403
from ginjax.geometric.geometric_image import *  # noqa: F401,F403
from ginjax.geometric.multi_image import *  # noqa: F401,F403
from ginjax.geometric.common import *  # noqa: F401,F403
# `hash` is shadowed on purpose, as in ginjax: geom.hash is the torus index helper.
from ginjax.geometric.functional_geometric_image import hash  # noqa: F401
