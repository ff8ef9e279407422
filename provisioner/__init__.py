"""hearth's controller side: cluster specs, placement, the boot engine, backends, the notebook API and CLI.

    from provisioner import Cluster, Pool
"""

__all__ = ["Cluster", "Pool"]


def __getattr__(name: str):
    # Imported on first use, so that `hearth vfio ...` does not load Ray.
    if name == "Cluster":
        from provisioner.cluster import Cluster

        return Cluster
    if name == "Pool":
        from provisioner.pool import Pool

        return Pool
    raise AttributeError(f"module 'provisioner' has no attribute {name!r}")
