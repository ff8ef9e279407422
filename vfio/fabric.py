"""NVIDIA Fabric Manager on an NVSwitch host (HGX/DGX): is it there, does it run, in which mode.

On an HGX board the GPUs reach each other over NVLink through NVSwitches, and the NVSwitch fabric only carries
traffic once Fabric Manager has set it up. hearth gives VMs GPUs, never NVSwitches: the NVSwitches stay with the
host, which is NVIDIA's "shared NVSwitch" virtualization model. In it Fabric Manager runs where the NVSwitches
are (here: the host), with FABRIC_MODE=1, and a partition holding exactly a VM's GPUs must be active before the
VM gets them; without that, CUDA in the guest fails with error 802 "system not yet initialized" as soon as the
GPUs try NVLink (kata-containers#11730). A VM with one GPU needs no partition (NVIDIA/nvrc#159).

What is read, under the host root (nothing is asked of systemd or of Fabric Manager itself):
    /usr/share/nvidia/nvswitch/fabricmanager.cfg    installed, and FABRIC_MODE (0 bare metal / full passthrough,
                                                    1 shared NVSwitch, 2 vGPU)
    /run/systemd/units/invocation:nvidia-fabricmanager.service    systemd started the unit and it is active
    /proc/<pid>/comm == nv-fabricmanage             its daemon runs (comm is cut at 15 characters)
"""

from __future__ import annotations

import os
import re

from pydantic import BaseModel

from vfio.hostroot import HostRoot

CONFIG = "usr/share/nvidia/nvswitch/fabricmanager.cfg"
UNIT = "nvidia-fabricmanager.service"
COMM = "nv-fabricmanage"
MODES = {0: "bare metal / full passthrough", 1: "shared NVSwitch", 2: "vGPU"}


class FabricManager(BaseModel, frozen=True):
    installed: bool
    running: bool
    mode: int | None  # FABRIC_MODE from its config, when installed (0 when the config does not set it)
    evidence: str  # what was found, for the report

    @property
    def shared_nvswitch(self) -> bool:
        return self.running and self.mode == 1

    def describe(self) -> str:
        if not self.installed and not self.running:
            return "Fabric Manager is not installed on this host"
        mode = f"FABRIC_MODE={self.mode} ({MODES.get(self.mode, 'unknown mode')})" if self.mode is not None else "mode unknown"
        return f"Fabric Manager {'runs' if self.running else 'is installed but does not run'}, {mode}"


def fabric_manager(host: HostRoot) -> FabricManager:
    mode, installed, found = None, False, []
    try:
        config = host.path(CONFIG).read_text()
    except OSError:
        config = None
    if config is not None:
        installed = True
        setting = re.search(r"^\s*FABRIC_MODE\s*=\s*(\d+)", config, re.M)
        mode = int(setting.group(1)) if setting else 0
        found.append(f"/{CONFIG}")
    unit = os.path.lexists(host.path("run/systemd/units", f"invocation:{UNIT}"))
    if unit:
        found.append(f"{UNIT} active")
    daemon = _daemon(host)
    if daemon is not None:
        found.append(f"nv-fabricmanager pid {daemon}")
    return FabricManager(installed=installed or unit or daemon is not None, running=unit or daemon is not None,
                         mode=mode, evidence=", ".join(found) or "nothing")


def _daemon(host: HostRoot) -> int | None:
    proc = host.path("proc")
    for entry in os.listdir(proc) if proc.is_dir() else []:
        if entry.isdigit():
            try:
                if (proc / entry / "comm").read_text().strip() == COMM:
                    return int(entry)
            except OSError:
                continue
    return None
