"""The two errors of the capture layer: one for each direction."""


class CaptureError(TypeError):
    """An object cannot travel as source and data (raised by ``dumps``/``encode``).

    ``path`` names where the value sits in what was dumped (``args[0].config['db']``),
    ``type_name`` its type; the message also says why and what to do instead.
    """

    def __init__(self, path: str, type_name: str, reason: str, workaround: str):
        self.path = path
        self.type_name = type_name
        self.reason = reason
        self.workaround = workaround
        super().__init__(f"cannot capture {path} ({type_name}): {reason}. {workaround}")


class BundleError(ValueError):
    """Bytes that are not a bundle this reader can rebuild (raised by ``loads``/``decode``):
    malformed, truncated, hostile, of an unknown format version, or whose shipped code
    fails to rebuild on this interpreter."""


class MissingSources(BundleError):
    """The bundle names source segments by digest only, and the receiver's store lacks
    ``digests``: the sender should send the bundle again with the text included."""

    def __init__(self, digests: list[str]):
        self.digests = digests
        super().__init__(f"{len(digests)} source segment(s) were sent by digest only and are not known here")
