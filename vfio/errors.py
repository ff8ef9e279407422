"""The errors `vfio/` raises, and the root of every hearth error.

`vfio/` is hearth's bottom layer: it imports nothing of the controller's, so the root class lives here and
`provisioner.errors` extends it (the whole tree is drawn there). Every message names what is wrong and
how to fix it.
"""

from __future__ import annotations

import traceback


class HearthError(Exception):
    """Base of every error hearth raises on purpose."""

    expected = True  # bad input, a refusal, a failed boot: the message is the whole story (False: a bug)

    def _render_traceback_(self) -> list[str]:
        """How IPython (a notebook, `%tb`) shows it: the message, which names the problem and the fix, without
        hearth's internal frames. Python's own traceback (a script, a log, `traceback.print_exception(
        sys.last_value)` in a notebook) is unchanged. A bug (`expected = False`) shows in full."""
        if not self.expected:
            return "".join(traceback.format_exception(self)).rstrip().splitlines()
        return [f"\x1b[31m{type(self).__name__}\x1b[0m: {self}"]


class SpecError(HearthError, ValueError):
    """Bad input: an address, a driver name, a spec field. Nothing was changed."""


class HostRootError(HearthError):
    """A host path is missing, or would leave the host root."""


class VfioError(HearthError):
    """The host refused or failed a VFIO operation."""


class BindRefused(VfioError):
    """A safety check said no before anything was written."""


class BindFailed(VfioError):
    """A write failed or timed out; `result` says what happened to each device (what was restored)."""

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result  # vfio.bind.Result
