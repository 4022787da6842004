"""A small interpretability library, written the way a researcher would write one.

Nothing here knows about sourcebox: every function opens ordinary nnsight traces with
``remote='local'``. Run through the sourcebox worker, the traced blocks and this
package's code travel as source to a worker that cannot import this package.
"""

from .lens import logit_lens
from .patching import patch_last_position
from .probes import RunningStats

__all__ = ["logit_lens", "patch_last_position", "RunningStats"]
