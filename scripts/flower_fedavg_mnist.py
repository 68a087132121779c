"""The workload of `configs/fedavg_mnist.yaml` in Flower 1.42's simulation, for
`scripts/bench_vs_flower.py`: FedAvg, 100 IID MNIST clients, 10 sampled per round,
E=1, B=10, SGD lr 0.1, McMahan's 2NN (200-200 MLP), centralised test accuracy after
every round. Runs in a venv with Flower, not fltool's (Flower is no fltool dependency):

    python3.11 -m venv /work/flower-venv
    /work/flower-venv/bin/pip install -c .ci/constraints.txt 'flwr[simulation]==1.42.0' torch
    MNIST_RAW=<folder with the 4 uncompressed MNIST IDX files> /work/flower-venv/bin/python scripts/flower_fedavg_mnist.py

Data are handled as fltool handles them, so the comparison is of the frameworks: the
IDX files are read once per process into normalised tensors (no torchvision, no
DataLoader), and the IID split is fltool's (seed 0 permutation, 100 equal chunks).
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import time
import types
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from torch import nn

NUM_CLIENTS, FRACTION, EPOCHS, BATCH, LR, SEED = 100, 0.1, 1, 10, 0.1, 0
MEAN, STD = 0.1307, 0.3081


def read_idx(path: Path) -> torch.Tensor:
    data = bytearray(path.read_bytes())
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return torch.frombuffer(data, dtype=torch.uint8, offset=4 + 4 * ndim).view(dims)


def mnist() -> dict[str, torch.Tensor]:
    """Normalised MNIST, read once per process (each Ray actor is a process).

    The cache lives in a module of its own in `sys.modules`, not in a global of this
    script: Ray ships the ClientApp to its actors with cloudpickle, which pickles
    functions of `__main__` by value together with the globals they use. A global dict
    filled by the server's first evaluation was sent, all 220 MB of MNIST, with every
    client message, which made an earlier version of this harness about 4x slower.
    """
    cache = sys.modules.setdefault("_flower_bench_mnist", types.ModuleType("_flower_bench_mnist"))
    data: dict[str, torch.Tensor] | None = getattr(cache, "data", None)
    if data is None:
        data = {}
        raw = Path(os.environ["MNIST_RAW"])
        for split, prefix in (("train", "train"), ("test", "t10k")):
            images = read_idx(raw / f"{prefix}-images-idx3-ubyte")
            data[f"x_{split}"] = images.float().div_(255).sub_(MEAN).div_(STD).unsqueeze(1)
            data[f"y_{split}"] = read_idx(raw / f"{prefix}-labels-idx1-ubyte").long()
        perm = torch.randperm(len(data["y_train"]), generator=torch.Generator().manual_seed(SEED))
        data["parts"] = torch.stack(torch.tensor_split(perm, NUM_CLIENTS))
        cache.data = data
    return data


def net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 10))


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    data = mnist()
    idx = data["parts"][int(context.node_config["partition-id"])]
    x, y = data["x_train"][idx], data["y_train"][idx]
    model = net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=float(msg.content["config"]["lr"]))
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(int(msg.content["config"]["server-round"]) * 1000 + int(context.node_config["partition-id"]))
    total = 0.0
    for _ in range(EPOCHS):
        order = torch.randperm(len(y), generator=g)
        for start in range(0, len(y), BATCH):
            b = order[start : start + BATCH]
            opt.zero_grad()
            loss = loss_fn(model(x[b]), y[b])
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
    metrics = MetricRecord({"train_loss": total / (EPOCHS * len(y)), "num-examples": len(y)})
    return Message(content=RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


server_app = ServerApp()


def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    data = mnist()
    model = net()
    model.load_state_dict(arrays.to_torch_state_dict())
    model.eval()
    with torch.no_grad():
        logits = model(data["x_test"])
    accuracy = (logits.argmax(1) == data["y_test"]).float().mean().item()
    loss = nn.functional.cross_entropy(logits, data["y_test"]).item()
    print(f"round {server_round}  acc {accuracy:.4f}  test_loss {loss:.4f}", flush=True)
    return MetricRecord({"accuracy": accuracy, "loss": loss})


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    torch.manual_seed(SEED)
    strategy = FedAvg(
        fraction_train=FRACTION, fraction_evaluate=0.0, min_train_nodes=int(FRACTION * NUM_CLIENTS), min_available_nodes=NUM_CLIENTS
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(net().state_dict()),
        num_rounds=int(os.environ.get("FLOWER_ROUNDS", "10")),
        train_config=ConfigRecord({"lr": LR}),
        evaluate_fn=central_evaluate,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--client-cpus", type=float, default=1.0, help="Ray CPUs per ClientApp (2 cores: 1 gives 2 actors)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=NUM_CLIENTS,
        backend_config={"client_resources": {"num_cpus": args.client_cpus, "num_gpus": 0.0}},
    )
    print(f"run_simulation_s: {time.perf_counter() - t0:.3f}", flush=True)
