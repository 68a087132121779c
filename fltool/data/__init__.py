from fltool.data.datasets import data_shape, load_dataset
from fltool.data.partition import natural_clients, partition
from fltool.data.types import Dataset, TensorSplit

__all__ = ["Dataset", "TensorSplit", "data_shape", "load_dataset", "natural_clients", "partition"]
