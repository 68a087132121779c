"""fltool: federated learning and DDP training from a YAML experiment spec."""

__version__ = "0.1.0"
