"""Sysfs-shaped host trees for tests, and a stand-in for the kernel's side of the PCI bind writes.

`HostTree` lays out what the kernel shows: `/sys/devices/pci0000:00/<address>/` with its attribute files (its
`resource` file in the kernel's format when BARs are given), `/sys/bus/pci/devices/<address>` as a relative
symlink to it, `driver` and `iommu_group` symlinks, `/sys/bus/pci/drivers/<name>/` with a link per bound device,
`/sys/kernel/iommu_groups/N/devices/`, `/sys/devices/system/node/node<N>/` (cpulist, 1 GiB hugepages),
`/sys/module/*`, `/proc/cmdline`, `/proc/cpuinfo` (with its address sizes), `/proc/<pid>/fd/*` links,
`/dev/vfio`.

`FakeKernel` is a STAND-IN, not the kernel: `drivers/*/bind`, `drivers/*/unbind` and `drivers_probe` are
FIFOs, and a thread per FIFO does what the kernel does on those writes (move the `driver` links, honour
`driver_override`, create and remove `/dev/vfio/N`). So hearth's real write path (open, write, close, with
its timeout) runs unchanged. `hang` makes a driver's unbind block its writer, as nvidia's does while the GPU
is in use; `broken` makes a driver refuse to bind.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

# IORESOURCE_* flags as /sys/.../resource shows them (include/linux/ioport.h): memory, its alignment is its size
MEM32 = 0x40200  # 32-bit, non-prefetchable
MEM64_PREF = 0x14220C  # 64-bit, prefetchable (with the BAR's own type bits in the low nibble)
ROM = 0x46200
NATIVE_BY_CLASS = {0x0300: "nvidia", 0x0302: "nvidia", 0x0403: "snd_hda_intel", 0x0C03: "xhci_hcd",
                   0x0C80: "nvidia-gpu", 0x0680: "nvidia", 0x0200: "mlx5_core", 0x0604: "pcieport"}


class HostTree:
    def __init__(self, root: Path, *, cpu: str = "GenuineIntel", cmdline: str = "intel_iommu=on iommu=pt",
                 modules: tuple[str, ...] = ("vfio", "vfio_pci", "vfio_iommu_type1"),
                 hugepages_1g: int = 0, drivers: tuple[str, ...] = ("vfio-pci",),
                 nodes: dict[int, str] | None = None, address_bits: int | None = 46) -> None:
        """`nodes`: NUMA node -> its cpulist (default: node 0 with CPUs 0-3); `hugepages_1g` is spread evenly
        over them. `address_bits`: the CPU's physical address width in /proc/cpuinfo (None: not stated)."""
        self.root = root
        self.native: dict[str, str | None] = {}
        self.sys = root / "sys"
        for d in ("bus/pci/devices", "bus/pci/drivers", "kernel/iommu_groups", "devices/pci0000:00", "module"):
            (self.sys / d).mkdir(parents=True, exist_ok=True)
        self.fifo(self.sys / "bus/pci/drivers_probe")
        (root / "proc").mkdir(exist_ok=True)
        (root / "proc/cmdline").write_text(f"BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro {cmdline}\n")
        sizes = f"address sizes\t: {address_bits} bits physical, 57 bits virtual\n" if address_bits else ""
        (root / "proc/cpuinfo").write_text(f"processor\t: 0\nvendor_id\t: {cpu}\n{sizes}")
        for module in modules:
            self.module(module)
        if "vfio" in modules:
            (root / "dev/vfio").mkdir(parents=True, exist_ok=True)
            (root / "dev/vfio/vfio").touch()
            os.chmod(root / "dev/vfio/vfio", 0o666)
        if "vfio_iommu_type1" in modules:
            params = self.sys / "module/vfio_iommu_type1/parameters"
            params.mkdir(parents=True, exist_ok=True)
            (params / "allow_unsafe_interrupts").write_text("N\n")
        for size, count in (("hugepages-2048kB", 0), ("hugepages-1048576kB", hugepages_1g)):
            pages = self.sys / "kernel/mm/hugepages" / size
            pages.mkdir(parents=True, exist_ok=True)
            (pages / "nr_hugepages").write_text(f"{count}\n")
            (pages / "free_hugepages").write_text(f"{count}\n")
        nodes = nodes or {0: "0-3"}
        for number, cpus in nodes.items():
            node = self.sys / f"devices/system/node/node{number}"
            node.mkdir(parents=True)
            (node / "cpulist").write_text(cpus + "\n")
        self.hugepages(*(hugepages_1g // len(nodes) + (hugepages_1g % len(nodes) if n == min(nodes) else 0)
                         for n in sorted(nodes)))
        self._mmio = {32: 0xC0000000, 64: 0x400_0000_0000}
        for driver in drivers:
            self.driver(driver)

    def hugepages(self, *free: int, total: tuple[int, ...] | None = None) -> None:
        """1 GiB hugepages per NUMA node (in node order): `free` of `total` (default: all free); the host's
        totals in /sys/kernel/mm/hugepages follow."""
        nodes = sorted(int(n.name[4:]) for n in (self.sys / "devices/system/node").glob("node*"))
        total = total or free
        for number, count, configured in zip(nodes, free, total):
            pages = self.sys / f"devices/system/node/node{number}/hugepages/hugepages-1048576kB"
            pages.mkdir(parents=True, exist_ok=True)
            (pages / "nr_hugepages").write_text(f"{configured}\n")
            (pages / "free_hugepages").write_text(f"{count}\n")
        (self.sys / "kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages").write_text(f"{sum(total)}\n")
        (self.sys / "kernel/mm/hugepages/hugepages-1048576kB/free_hugepages").write_text(f"{sum(free)}\n")

    def resource(self, address: str, bars: list[tuple[int, int, int]]) -> None:
        """Write a device's `resource` file as the kernel does: lines 0-5 the BARs, 6 the ROM, then the rest,
        each `start end flags` in %#018x; `bars` is (index, size, flags), placed naturally aligned."""
        lines = [(0, 0, 0)] * 13
        for index, size, flags in bars:
            wide = 64 if flags & 0x100000 else 32
            start = -(-self._mmio[wide] // size) * size
            self._mmio[wide] = start + size
            lines[index] = (start, start + size - 1, flags)
        text = "".join(f"0x{a:016x} 0x{b:016x} 0x{c:016x}\n" for a, b, c in lines)
        (self.sys / "bus/pci/devices" / address / "resource").write_text(text)

    @staticmethod
    def fifo(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)

    def module(self, name: str) -> None:
        (self.sys / "module" / name).mkdir(parents=True, exist_ok=True)

    def driver(self, name: str) -> Path:
        path = self.sys / "bus/pci/drivers" / name
        if not path.exists():
            path.mkdir(parents=True)
            self.fifo(path / "bind")
            self.fifo(path / "unbind")
            (path / "new_id").touch()
            self.module(name.replace("-", "_"))
        return path

    def device(self, address: str, vendor: int, device: int, pci_class: int, *, driver: str | None = None,
               group: int | None = None, numa: int = 0, native: str | None = "class",
               subsystem: tuple[int, int] = (0x10DE, 0x16C1), link: tuple[str, int] = ("32.0 GT/s PCIe", 16),
               reset: str | None = "flr bus", bars: list[tuple[int, int, int]] | None = None) -> Path:
        base = self.sys / "devices/pci0000:00" / address
        base.mkdir(parents=True)
        files = {"vendor": f"0x{vendor:04x}", "device": f"0x{device:04x}", "class": f"0x{pci_class:06x}",
                 "subsystem_vendor": f"0x{subsystem[0]:04x}", "subsystem_device": f"0x{subsystem[1]:04x}",
                 "numa_node": str(numa), "driver_override": "(null)", "d3cold_allowed": "1",
                 "current_link_speed": link[0], "current_link_width": str(link[1]),
                 "max_link_speed": link[0], "max_link_width": str(link[1])}
        if reset is not None:
            files["reset_method"] = reset
        for name, value in files.items():
            (base / name).write_text(value + "\n")
        if pci_class >> 8 == 0x0604:
            (base / "pci_bus").mkdir()
        _link(self.sys / "bus/pci/devices" / address, base)
        if bars is not None:
            self.resource(address, bars)
        if group is not None:
            group_dir = self.sys / "kernel/iommu_groups" / str(group)
            (group_dir / "devices").mkdir(parents=True, exist_ok=True)
            (group_dir / "type").write_text("DMA\n")
            _link(group_dir / "devices" / address, base)
            _link(base / "iommu_group", group_dir)
        self.native[address] = NATIVE_BY_CLASS.get(pci_class >> 8) if native == "class" else native
        if driver:
            self.attach(address, driver)
        return base

    # The kernel's side, shared by the fixtures and FakeKernel.
    def current(self, address: str) -> str | None:
        try:
            return os.path.basename(os.readlink(self.sys / "bus/pci/devices" / address / "driver"))
        except OSError:
            return None

    def override(self, address: str) -> str | None:
        value = (self.sys / "bus/pci/devices" / address / "driver_override").read_text().strip()
        return None if value in ("", "(null)") else value

    def attach(self, address: str, driver: str) -> None:
        base = (self.sys / "bus/pci/devices" / address).resolve()
        drv = self.driver(driver)
        _link(base / "driver", drv)
        _link(drv / address, base)
        if driver == "vfio-pci" and (group := self.group(address)) is not None:
            node = self.root / "dev/vfio" / str(group)
            node.parent.mkdir(parents=True, exist_ok=True)
            node.touch()
            os.chmod(node, 0o600)

    def detach(self, address: str) -> None:
        driver = self.current(address)
        if driver is None:
            return
        base = (self.sys / "bus/pci/devices" / address).resolve()
        os.unlink(base / "driver")
        os.unlink(self.sys / "bus/pci/drivers" / driver / address)
        group = self.group(address)
        if driver == "vfio-pci" and group is not None:
            members = os.listdir(self.sys / "kernel/iommu_groups" / str(group) / "devices")
            if not any(self.current(m) == "vfio-pci" for m in members):
                (self.root / "dev/vfio" / str(group)).unlink(missing_ok=True)

    def group(self, address: str) -> int | None:
        try:
            return int(os.path.basename(os.readlink(self.sys / "bus/pci/devices" / address / "iommu_group")))
        except OSError:
            return None

    def process(self, pid: int, command: str, fds: list[str]) -> None:
        proc = self.root / "proc" / str(pid)
        (proc / "fd").mkdir(parents=True)
        (proc / "comm").write_text(command + "\n")
        for n, target in enumerate(fds, start=3):
            os.symlink(target, proc / "fd" / str(n))

    def nvidia_minor(self, address: str, minor: int) -> None:
        info = self.root / "proc/driver/nvidia/gpus" / address
        info.mkdir(parents=True)
        (info / "information").write_text(f"Model: \t\t NVIDIA H100 80GB HBM3\nIRQ:   \t\t 42\nDevice Minor: \t {minor}\n")

    def snapshot(self) -> dict[str, tuple[str | None, str | None]]:
        """Every device's (driver, driver_override), to assert that nothing changed."""
        return {a: (self.current(a), self.override(a)) for a in sorted(os.listdir(self.sys / "bus/pci/devices"))}


class FakeKernel:
    """Serves the bind FIFOs of a HostTree the way the kernel serves those sysfs files. A stand-in."""

    def __init__(self, tree: HostTree, hang: set[str] = frozenset(), broken: set[str] = frozenset()) -> None:
        self.tree = tree
        self.hang, self.broken = set(hang), set(broken)
        self.writes: list[tuple[str, str]] = []  # (path relative to the root, value), in order
        self._stop = False
        self._threads: list[threading.Thread] = []

    def _fifos(self) -> list[Path]:
        drivers = self.tree.sys / "bus/pci/drivers"
        return [self.tree.sys / "bus/pci/drivers_probe"] + [
            drivers / d / f for d in sorted(os.listdir(drivers)) for f in ("bind", "unbind")]

    def __enter__(self) -> FakeKernel:
        for fifo in self._fifos():
            if fifo.name == "unbind" and fifo.parent.name in self.hang:
                continue  # nobody reads: the writer blocks, like an nvidia unbind with users
            thread = threading.Thread(target=self._serve, args=(fifo,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        for fifo in self._fifos():
            flags = os.O_RDONLY if fifo.name == "unbind" and fifo.parent.name in self.hang else os.O_WRONLY
            try:  # wake the reader blocked in open(), or release a writer blocked on a hung FIFO
                fd = os.open(fifo, flags | os.O_NONBLOCK)
            except OSError:
                continue
            if flags == os.O_RDONLY:
                threading.Event().wait(0.05)
            os.close(fd)
        for thread in self._threads:
            thread.join(2)

    def _serve(self, fifo: Path) -> None:
        while True:
            with open(fifo, "rb") as f:
                data = f.read().decode()
            if self._stop:
                return
            for value in data.split():
                self.writes.append((str(fifo.relative_to(self.tree.root)), value))
                self._handle(fifo, value)

    def _handle(self, fifo: Path, address: str) -> None:
        tree = self.tree
        if not (tree.sys / "bus/pci/devices" / address).exists():
            return  # the kernel answers ENODEV
        current = tree.current(address)
        if fifo.name == "unbind":
            if current == fifo.parent.name:
                tree.detach(address)
            return
        if current is not None:
            return  # already bound: bind and probe do nothing
        if fifo.name == "bind":
            target = fifo.parent.name
            if tree.override(address) not in (None, target):
                return  # driver_override only lets the named driver bind
        else:  # drivers_probe
            target = tree.override(address) or tree.native.get(address)
        if target and (tree.sys / "bus/pci/drivers" / target).is_dir() and target not in self.broken:
            tree.attach(address, target)


def _link(link: Path, target: Path) -> None:
    """A relative symlink, as sysfs makes them, so the tree stays inside its root."""
    os.symlink(os.path.relpath(target, link.parent), link)
