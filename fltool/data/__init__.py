from fltool.data.datasets import Dataset, TensorSplit, data_shape, load_dataset
from fltool.data.partition import natural_clients, partition

__all__ = ["Dataset", "TensorSplit", "data_shape", "load_dataset", "natural_clients", "partition"]
