"""Shared set-up: device choice, seeded model construction."""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from fltool.config import Config
from fltool.class_path import first_line
from fltool.config.schema import ModelConfig
from fltool.data import Dataset, data_shape, load_dataset, natural_clients
from fltool.errors import FltoolError
from fltool.models import MODELS, build_model, model_label

LARGEST_SIDE_TRIED = 256  # when telling the smallest input a model takes


def seeded_model(cfg: Config, dataset: Dataset, device: torch.device) -> nn.Module:
    """The initial global model: the same weights for the same seed, on any rank."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, dataset.input_shape, dataset.num_classes).to(device)
    if getattr(model, "example_input_array", None) is None:
        # Lightning's convention: what `engine: auto` probes one batched step with
        model.example_input_array = dataset.train.x[:2]
    return model


def check_model_fits(cfg: Config) -> None:
    """A model that cannot take the data's inputs fails here, in one line and before any
    run directory or worker exists, not as a convolution error in the first round."""
    shape, classes = data_shape(cfg.data)  # your data (data.class_path) is loaded, and checked, here
    if cfg.data.partition == "natural" and cfg.mode == "federated":
        natural_clients(cfg, load_dataset(cfg.data, cfg.seed))  # K, before config.yaml is written
    if cfg.data.class_path or (cfg.model.class_path and cfg.model.class_path not in MODELS):
        check_user_model(cfg, shape, classes)
        return
    if _takes(cfg.model, shape, classes, meta=False):
        return
    side = next((s for s in range(1, LARGEST_SIDE_TRIED + 1) if _takes(cfg.model, (shape[0], s, s), classes)), None)
    need = f"inputs of at least {side}x{side}" if side else "larger inputs"
    raise FltoolError(f"model.name: {cfg.model.name} needs {need}; data.synthetic.shape is {list(shape)}")


def check_user_model(cfg: Config, shape: tuple[int, ...], classes: int) -> None:
    """Build the model and run it on a batch of 2 real inputs (zeros for a built-in
    dataset) on the CPU: a constructor error, a forward error or logits of the wrong
    shape is one line naming the model's key. The global RNG is left as it was."""
    key = "model.class_path" if cfg.model.class_path else "model.name"
    label = model_label(cfg.model)
    x = load_dataset(cfg.data, cfg.seed).train.x[:2] if cfg.data.class_path else torch.zeros(2, *shape)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        model = build_model(cfg.model, shape, classes)
        model.eval()
        try:
            out = model(x)
        except Exception as exc:
            raise FltoolError(
                f"{key}: {label} fails on a batch of inputs {list(x.shape)} ({type(exc).__name__}: {first_line(exc)})"
            ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (x.shape[0], classes):
        got = list(out.shape) if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        raise FltoolError(
            f"{key}: {label} returns {got} for a batch of {x.shape[0]}; expected [{x.shape[0]}, {classes}] "
            f"(a logit per class of the data's {classes})"
        )


def _takes(name: str | ModelConfig, shape: tuple[int, ...], classes: int, meta: bool = True) -> bool:
    """Whether model `name` runs on one input of `shape`: a forward pass on the meta
    device, which checks every shape and computes nothing, or with `meta=False` a real
    one on the CPU (eval mode, the global RNG left as it was). The data's own shape is
    tried for real: on meta, PyTorch's Python decompositions import sympy and
    torch._dynamo, seconds of every run's start-up; a built-in model's one-input
    forward costs milliseconds."""
    # not a torch.device("cpu") context: its __torch_function__ mode slows every op
    device = torch.device("meta") if meta else contextlib.nullcontext()
    with device, warnings.catch_warnings(), torch.random.fork_rng(devices=[], enabled=not meta), torch.no_grad():
        warnings.simplefilter("ignore")  # a Linear of zero inputs warns when built
        model = build_model(name, shape, classes)
        model.eval()
        try:
            model(torch.zeros(1, *shape))
        except RuntimeError:
            return False
    return True


def has_running_stats(model: nn.Module) -> bool:
    return any(getattr(m, "track_running_stats", False) for m in model.modules())
