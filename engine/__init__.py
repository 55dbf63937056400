"""tsdpo-studio engine: models, preference data, directions, mixing, generation, storage, CLI.

Nothing under ``engine`` imports Qt; the studio is a view over this package.
"""

from engine.errors import TsdpoError

__version__ = "0.1.0"
__all__ = ["TsdpoError", "__version__"]
