"""hearth's host side: the PCI and IOMMU picture read from sysfs, NVML inventory, safe vfio-pci binding."""
