"""The host shapes hearth must get right, built as trees (see hosttree.py). Addresses and ids are real:
an HGX H100 board's GPUs (10de:2330) and NVSwitches (10de:22a3), an L40S server's GPUs (10de:26b9), an RTX 4090
card (10de:2684) with its audio, USB and UCSI functions, a ConnectX NIC (15b3:1017).

BARs and NUMA layouts are real too: an HGX H100's GPUs have three 64-bit prefetchable BARs, 16 MiB (BAR0), 128 GiB
(BAR2) and 32 MiB (BAR4) (`lspci -v` of an 8x H100 host, fastfetch-cli/fastfetch#1658), four GPUs per socket on
a dual Xeon Platinum 8480+ (56 cores, 112 threads a socket; `address sizes: 46 bits physical`); an NVSwitch has a
32 MiB 32-bit BAR. An L40S has a 16 MiB 32-bit BAR0, a 64 GiB BAR1 and a 32 MiB BAR3, both 64-bit prefetchable
(cloud-hypervisor docs/vfio.md), here four of them, two per socket of a dual AMD EPYC 9354 (32 cores, 64 threads a
socket; 52 bits physical)."""

from __future__ import annotations

from pathlib import Path

from hosttree import MEM32, MEM64_PREF, HostTree

GIB, MIB = 1 << 30, 1 << 20
H100_BARS = [(0, 16 * MIB, MEM64_PREF), (2, 128 * GIB, MEM64_PREF), (4, 32 * MIB, MEM64_PREF)]
L40S_BARS = [(0, 16 * MIB, MEM32), (1, 64 * GIB, MEM64_PREF), (3, 32 * MIB, MEM64_PREF)]
NVSWITCH_BARS = [(0, 32 * MIB, MEM32)]
HGX_NODES = {0: "0-55,112-167", 1: "56-111,168-223"}
HGX_GPUS = ["0000:18:00.0", "0000:2a:00.0", "0000:3a:00.0", "0000:5d:00.0",
            "0000:9a:00.0", "0000:ab:00.0", "0000:ba:00.0", "0000:db:00.0"]
HGX_NVSWITCHES = ["0000:05:00.0", "0000:06:00.0", "0000:07:00.0", "0000:08:00.0"]


def hgx_h100(root: Path, gpu_driver: str = "nvidia", *, hugepages_1g: int = 1800,
             address_bits: int | None = 46) -> HostTree:
    """8 H100 SXM GPUs (NUMA 0: the first four) and 4 NVSwitches, each in its own IOMMU group, behind root
    ports; a NIC; `hugepages_1g` split over the two nodes."""
    tree = HostTree(root, hugepages_1g=hugepages_1g, drivers=("vfio-pci", "nvidia", "mlx5_core", "pcieport"),
                    nodes=HGX_NODES, address_bits=address_bits)
    group = 10
    for index, address in enumerate(HGX_GPUS):
        bus = int(address[5:7], 16)
        tree.device(f"0000:{bus - 1:02x}:01.0", 0x8086, 0x352A, 0x060400, driver="pcieport", group=group,
                    numa=index // 4, subsystem=(0x8086, 0x0000))
        tree.device(address, 0x10DE, 0x2330, 0x030200, driver=gpu_driver, group=group + 1, numa=index // 4,
                    bars=H100_BARS)
        if gpu_driver == "nvidia":
            tree.nvidia_minor(address, index)
        group += 2
    for address in HGX_NVSWITCHES:
        tree.device(address, 0x10DE, 0x22A3, 0x068000, driver="nvidia", group=group, numa=0,
                    link=("2.5 GT/s PCIe", 1), bars=NVSWITCH_BARS)
        group += 1
    tree.device("0000:19:00.0", 0x15B3, 0x1021, 0x020000, driver="mlx5_core", group=group, numa=0,
                subsystem=(0x15B3, 0x0041))
    return tree


L40S_GPUS = ["0000:01:00.0", "0000:41:00.0", "0000:81:00.0", "0000:c1:00.0"]
L40S_NODES = {0: "0-31,64-95", 1: "32-63,96-127"}


def l40s_server(root: Path, gpu_driver: str = "vfio-pci", *, hugepages_1g: int = 0) -> HostTree:
    """4 L40S (NUMA 0: the first two), each alone in its IOMMU group behind a root port, on vfio-pci."""
    tree = HostTree(root, cpu="AuthenticAMD", cmdline="amd_iommu=on iommu=pt", hugepages_1g=hugepages_1g,
                    drivers=("vfio-pci", "nvidia", "pcieport"), nodes=L40S_NODES, address_bits=52)
    for index, address in enumerate(L40S_GPUS):
        bus = int(address[5:7], 16)
        tree.device(f"0000:{bus - 1 if bus else 0:02x}:01.{1 + index}", 0x1022, 0x14AB, 0x060400, driver="pcieport",
                    group=40 + 2 * index, numa=index // 2, subsystem=(0x1022, 0x1453))
        tree.device(address, 0x10DE, 0x26B9, 0x030200, driver=gpu_driver, group=41 + 2 * index, numa=index // 2,
                    subsystem=(0x10DE, 0x1851), link=("16.0 GT/s PCIe", 16), bars=L40S_BARS)
    return tree


WORKSTATION_GPU = "0000:01:00.0"
WORKSTATION_FUNCTIONS = ["0000:01:00.1", "0000:01:00.2", "0000:01:00.3"]


def workstation(root: Path) -> HostTree:
    """An AMD workstation with an RTX 4090 whose group holds VGA, audio, USB and UCSI functions and the
    root port above them."""
    tree = HostTree(root, cpu="AuthenticAMD", cmdline="amd_iommu=on iommu=pt quiet", hugepages_1g=32,
                    drivers=("vfio-pci", "nvidia", "snd_hda_intel", "xhci_hcd", "nvidia-gpu", "pcieport"))
    tree.device("0000:00:01.1", 0x1022, 0x14AB, 0x060400, driver="pcieport", group=12, subsystem=(0x1022, 0x1453))
    tree.device(WORKSTATION_GPU, 0x10DE, 0x2684, 0x030000, driver="nvidia", group=12, subsystem=(0x10DE, 0x167C))
    tree.device("0000:01:00.1", 0x10DE, 0x22BA, 0x040300, driver="snd_hda_intel", group=12)
    tree.device("0000:01:00.2", 0x10DE, 0x1AEC, 0x0C0330, driver="xhci_hcd", group=12)
    tree.device("0000:01:00.3", 0x10DE, 0x1AED, 0x0C8000, driver="nvidia-gpu", group=12)
    tree.nvidia_minor(WORKSTATION_GPU, 0)
    return tree


SHARED_GPU, SHARED_NIC = "0000:41:00.0", "0000:42:00.0"


def gpu_with_nic(root: Path) -> HostTree:
    """A GPU behind a switch without ACS: its IOMMU group also holds a NIC the host uses."""
    tree = HostTree(root, hugepages_1g=64, drivers=("vfio-pci", "nvidia", "mlx5_core"))
    tree.device(SHARED_GPU, 0x10DE, 0x2331, 0x030200, driver="nvidia", group=30)
    tree.device(SHARED_NIC, 0x15B3, 0x1017, 0x020000, driver="mlx5_core", group=30, subsystem=(0x15B3, 0x0007))
    tree.nvidia_minor(SHARED_GPU, 0)
    return tree


def iommu_off(root: Path) -> HostTree:
    """The IOMMU disabled: no groups, nothing on the command line, no vfio modules, no hugepages."""
    tree = HostTree(root, cmdline="quiet splash", modules=(), drivers=("nvidia",))
    tree.device("0000:3b:00.0", 0x10DE, 0x2330, 0x030200, driver="nvidia")
    tree.nvidia_minor("0000:3b:00.0", 0)
    return tree
