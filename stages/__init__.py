"""The runnable stages, one file each: `python -m stages.<stage>` (what make runs). Nothing imports a stage.

Importing this package runs first, before a stage's own imports, whatever their order: it imports alignment, whose
__init__ quiets third-party noise before torch, transformers or peft can make it.
"""

import alignment  # noqa: F401
