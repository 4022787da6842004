"""An import guarded by typing.TYPE_CHECKING, used only in string annotations."""
import typing

if typing.TYPE_CHECKING:
    from module_that_exists_nowhere import Batch


def batch_size(batch: "Batch") -> "int":
    return len(batch)
