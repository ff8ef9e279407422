"""The `cloud-hypervisor` backend: a microVM per node, with whole GPUs through VFIO.

This controller drives cloud-hypervisor on the machine it runs on (hosts with `address: local`); remote
hosts go through the host agent. The guest learns how to join Ray over the guest channel (address,
token, labels), never from its command line.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from provisioner.backends import JoinInfo
from provisioner.ch.config import GpuGroup, vm_spec
from provisioner.ch.vmm import ChVm
from provisioner.errors import SpecError
from provisioner.events import NodeHistory, OnEvent
from provisioner.placement import NodePlacement
from provisioner.spec import ClusterSpec, Host

StandinSettings = Callable[[str], dict[str, Any]]


class CloudHypervisorBackend:
    name = "cloud-hypervisor"
    physical_gpus = True

    def __init__(self, spec: ClusterSpec, hosts: list[Host], run_dir: Path, *,
                 standin: StandinSettings | None = None, scratch_mib: int = 0) -> None:
        remote = [h.name for h in hosts if h.address != "local"]
        if remote:
            raise SpecError(f"hosts {', '.join(remote)} are remote: reaching them needs the host agent over SSH, "
                            "which this controller does not have yet; use address: local")
        self.spec = spec
        self.hosts = {h.name: h for h in hosts}
        self.run_dir = run_dir
        self.standin = standin  # stand-in VMM settings per node id (HEARTH_STANDIN), for tests and benchmarks
        self.scratch_mib = scratch_mib
        self._cids = itertools.count(3)

    def node(self, placement: NodePlacement, join: JoinInfo, history: NodeHistory,
             on_event: OnEvent | None) -> ChVm:
        host = self.hosts[placement.host]
        image = self.spec.image
        initrd = image / "initrd.img"
        vm = vm_spec(
            node_id=placement.node_id, kernel=image / "vmlinuz", initramfs=initrd if initrd.is_file() else None,
            image=image / "rootfs.img", cpus=self.spec.cpus, memory_mib=self.spec.memory_gib * 1024,
            vsock_cid=next(self._cids), sysfs_root=host.host_root,
            gpus=[GpuGroup(address=g.address, functions=g.functions, clique=g.clique) for g in placement.gpus])
        guest_config = {"ray": {"address": join.address, "token": join.token, "labels": join.labels,
                                "num_cpus": join.num_cpus, "num_gpus": join.num_gpus}, "env": join.env}
        env = {"HEARTH_STANDIN": json.dumps(self.standin(placement.node_id))} if self.standin else None
        return ChVm(vm, self.run_dir, binary=host.cloud_hypervisor, history=history, on_event=on_event,
                    guest_config=guest_config, env=env, scratch_mib=self.scratch_mib)
