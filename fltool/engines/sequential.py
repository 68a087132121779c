"""The sequential engine: one client after another, each a plain functional SGD loop
(`fltool.algorithms.local.client_update`), the algorithm's hooks called with a stack of
one client. The reference the vectorized engine is tested against."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fltool.algorithms import ClientInfo
from fltool.algorithms.local import client_update, full_gradient
from fltool.devices import host_to_device
from fltool.engines.base import (
    ClientData,
    CohortJob,
    client_batches,
    client_dropout_seed,
    empty_upload,
    make_apply_fn,
)


class SequentialEngine:
    name = "sequential"

    def __init__(self, model: nn.Module, seed: int, amp: str = "none") -> None:
        self.model = model
        self.seed = seed
        self.apply_fn = make_apply_fn(model, amp)

    def train_cohort(self, global_params: Sequence[Tensor], clients: Sequence[ClientData], job: CohortJob) -> Tensor:
        algorithm = job.algorithm
        device = global_params[0].device
        loss_sum = torch.zeros((), device=device)
        if not clients:
            empty_upload(job, global_params)
            return loss_sum
        self.model.train()
        for client in clients:
            batches = batches_on(client_batches(self.seed, job.round, client, algorithm.rule), client.x.device)
            context = job.context_for([client.id])
            if algorithm.needs_global_gradient:
                grad = full_gradient(self.apply_fn, global_params, client.x, client.y)
                context = {**context, "global_grad": [g.unsqueeze(0) for g in grad]}
            torch.manual_seed(client_dropout_seed(self.seed, job.round, client.id))
            params, client_loss = client_update(self.apply_fn, global_params, client.x, client.y, algorithm, batches, context)
            info = ClientInfo(
                ids=host_to_device(torch.tensor([client.id]), device),
                n=host_to_device(torch.tensor([float(client.n)]), device),
                steps=host_to_device(torch.tensor([float(len(batches))]), device),
            )
            job.collect(info.ids, algorithm.client_upload(global_params, [p.unsqueeze(0) for p in params], context, info))
            loss_sum = loss_sum + client_loss * (client.n / len(batches))
        return loss_sum


def batches_on(batches: list[Tensor], device: torch.device) -> list[Tensor]:
    """A client's whole schedule on `device` in one copy, not one blocking copy per step."""
    if device.type == "cpu":
        return batches
    flat = host_to_device(torch.cat(batches), device)
    return list(flat.split([b.numel() for b in batches]))
