"""hearth's controller side: cluster specs, placement, the boot engine, backends and the CLI."""
