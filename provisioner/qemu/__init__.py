"""QEMU: the VM driver for hosts without cloud-hypervisor (and for CI, which boots the real guest image)."""
