"""Secure aggregation (SecAgg / SecAgg+) as real cryptography in a simulation.

The server learns only the (quantised) sum of the surviving clients' updates; see
docs/secagg.md for what that protects and what it does not.
"""

from fltool.algorithms.secagg.crypto import TamperedMessage
from fltool.algorithms.secagg.encoding import check_capacity, dequantize, error_bound, quantize, reduce_mod
from fltool.algorithms.secagg.graph import default_neighbours, neighbour_graph
from fltool.algorithms.secagg.protocol import Client, RoundResult, SecAggAbort, SecAggParams, Server, Transcript, run_round

__all__ = [
    "Client", "RoundResult", "SecAggAbort", "SecAggParams", "Server", "TamperedMessage", "Transcript",
    "check_capacity", "default_neighbours", "dequantize", "error_bound", "neighbour_graph", "quantize",
    "reduce_mod", "run_round",
]
