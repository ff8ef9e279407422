"""The logs of VMs that have ended: kept for whoever asks how a VM ended, bounded, and off /run.

A VM's serial console and VMM log live in its run directory (under /run: memory) while it runs. When it ends
by itself (its boot failed, the VMM crashed, the guest powered off, its controller's lease lapsed) its
controller or an admin may still ask why (GET /v1/vms/{id}/logs), so the last KEPT_BYTES of each log move to
`<state dir>/ended/<id>/` and the run directory goes. Only the KEPT_VMS most recently ended VMs keep theirs.
A VM its controller deleted, or whose controller released its lease, keeps none: nobody will ask.
Keeping is best effort: a full disk loses the logs, never the VM's teardown.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from provisioner.vm import LOG_TAIL_BYTES, tail

KEPT_VMS = 32
KEPT_BYTES = LOG_TAIL_BYTES


class KeptLogs:
    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def keep(self, vm_id: str, logs: dict[str, Path]) -> None:
        """Keep the tail of each of `logs` (name -> file) for VM `vm_id`; the files themselves are removed."""
        try:
            target = self.dir / vm_id
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True, mode=0o700)
            for name, path in logs.items():
                text = tail(path)
                if text:
                    (target / name).write_text(text)
            self._prune()
        except OSError:
            shutil.rmtree(self.dir / vm_id, ignore_errors=True)
        finally:
            for path in logs.values():
                path.unlink(missing_ok=True)

    def read(self, vm_id: str) -> dict[str, str] | None:
        target = self.dir / vm_id
        if not target.is_dir():
            return None
        return {path.name: tail(path) for path in target.iterdir()}

    def forget(self, vm_id: str) -> None:
        shutil.rmtree(self.dir / vm_id, ignore_errors=True)

    def _prune(self) -> None:
        kept = sorted(self.dir.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in kept[KEPT_VMS:]:
            shutil.rmtree(old, ignore_errors=True)

    def count(self) -> int:
        return sum(1 for _ in self.dir.iterdir()) if self.dir.is_dir() else 0
