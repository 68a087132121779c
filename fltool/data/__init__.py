from fltool.data.datasets import Dataset, TensorSplit, load_dataset
from fltool.data.partition import partition

__all__ = ["Dataset", "TensorSplit", "load_dataset", "partition"]
