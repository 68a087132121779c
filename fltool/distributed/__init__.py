"""Data-parallel training under torchrun: `fltool launch`, the DDP trainer, TorchComm."""
