"""The experiment config: one dataclass tree, the single source of truth.

Each field may carry `check` metadata: a (predicate, description) pair used by the
validator. Allowed string values are expressed with `Literal` so the validator can
list them in its error message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["federated", "ddp"]


def _check(pred, text: str) -> dict:
    return {"check": (pred, text)}


# finite too: an infinite lr trains to NaN, an infinite Dirichlet alpha never returns
POSITIVE = _check(lambda v: 0 < v < math.inf, "a finite number > 0")
NON_NEGATIVE = _check(lambda v: 0 <= v < math.inf, "a finite number >= 0")
AT_LEAST_ONE = _check(lambda v: v >= 1, ">= 1")
UNIT_INTERVAL_OPEN_LEFT = _check(lambda v: 0 < v <= 1, "in (0, 1]")
UNIT_INTERVAL_CLOSED = _check(lambda v: 0 <= v <= 1, "in [0, 1]")
PERCENT = _check(lambda v: 0 < v <= 1, "in (0, 1] (a fraction, not a percentage)")
# the range calibration searches (privacy/accountant.py); dp-accounting's RDP fails past
# ~1e8, and divides by zero near 1e-300
NOISE_MULTIPLIER = _check(lambda v: v == 0 or 1e-6 <= v <= 1e6, "0 (no noise) or in [1e-6, 1e6]")
MAPPING = _check(lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v), "a mapping of names to values")


@dataclass
class SyntheticConfig:
    """A deterministic Gaussian-mixture classification set, for fast tests and timing."""

    train_size: int = field(default=2000, metadata=AT_LEAST_ONE)
    test_size: int = field(default=500, metadata=AT_LEAST_ONE)
    shape: list[int] = field(default_factory=lambda: [1, 28, 28])
    num_classes: int = field(default=10, metadata=_check(lambda v: v >= 2, ">= 2"))
    noise: float = field(default=1.0, metadata=POSITIVE)


@dataclass
class DataConfig:
    dataset: Literal[
        "mnist", "fashion_mnist", "cifar10", "cifar100", "emnist_byclass", "emnist_balanced", "synthetic"
    ] = "mnist"
    # your data: "pkg.mod:fn" (or "pkg.mod.fn"), called with init_args, returning train and
    # test (x, y) tensors or torch Datasets, optionally train client ids (see fltool.data.user);
    # it replaces `dataset`
    class_path: str | None = None
    init_args: dict[str, Any] = field(default_factory=dict, metadata=MAPPING)
    root: str | None = None  # read-only source of raw archives; else $FLTOOL_DATA
    cache: str | None = None  # where archives are extracted; else $FLTOOL_CACHE or ~/.cache/fltool
    # natural: one client per client id the class_path data gives; their count is K
    partition: Literal["iid", "shards", "dirichlet", "natural"] = "iid"
    min_examples: int = field(default=1, metadata=AT_LEAST_ONE)  # natural: clients with fewer are dropped
    alpha: float = field(default=0.5, metadata=POSITIVE)  # dirichlet concentration
    shards_per_client: int = field(default=2, metadata=AT_LEAST_ONE)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    name: Literal["mlp", "cnn", "cnn_small", "cnn_cifar", "resnet8_gn"] = "mlp"
    # your model: "pkg.mod:Net" (or "pkg.mod.Net"), any nn.Module class or function,
    # called as class_path(**init_args); it replaces `name` (see fltool.models.user)
    class_path: str | None = None
    init_args: dict[str, Any] = field(default_factory=dict, metadata=MAPPING)


@dataclass
class FederatedConfig:
    num_clients: int = field(default=100, metadata=AT_LEAST_ONE)  # K
    fraction: float = field(default=0.1, metadata=UNIT_INTERVAL_OPEN_LEFT)  # C
    rounds: int = field(default=50, metadata=AT_LEAST_ONE)
    local_epochs: int = field(default=1, metadata=AT_LEAST_ONE)  # E
    batch_size: int | None = field(default=10, metadata=AT_LEAST_ONE)  # B; null = full batch
    lr: float = field(default=0.1, metadata=POSITIVE)  # client learning rate
    engine: Literal["sequential", "vectorized", "auto"] = "sequential"
    # vectorized engine: clients trained at once per chunk; null = as many as a memory budget holds
    max_parallel_clients: int | None = field(default=None, metadata=AT_LEAST_ONE)
    # vectorized engine on CUDA: capture each chunk shape's local step once, replay it per step
    cuda_graphs: bool = True
    # clients' forward passes under bf16 autocast; weights, gradients, updates and evaluation stay fp32
    amp: Literal["none", "bf16"] = "none"
    # fixed: round(C * K) clients without replacement; poisson: each client independently
    # with probability C, the sampling the DP accountant amplifies by
    sampling: Literal["fixed", "poisson"] = "fixed"


@dataclass
class ClientsConfig:
    """How sampled clients fail to do their part; every draw is seeded by (seed, round,
    client), so reruns and resumes repeat it exactly."""

    # probability that a sampled client never returns its update
    dropout: float = field(default=0.0, metadata=UNIT_INTERVAL_CLOSED)
    # a round in which fewer clients return fails: `on_too_few` resamples or skips it
    min_returned: int = field(default=1, metadata=AT_LEAST_ONE)
    on_too_few: Literal["resample", "skip"] = "resample"
    # fraction of each round's clients that are slow (Li et al. 2020, section 5.2): each
    # completes a uniformly drawn number of local epochs in [1, E] (or of steps)
    stragglers: float = field(default=0.0, metadata=UNIT_INTERVAL_CLOSED)
    straggler_work: Literal["epochs", "steps"] = "epochs"
    # drop: stragglers are discarded (FedAvg in the paper); partial: their work counts (FedProx)
    straggler_policy: Literal["drop", "partial"] = "drop"


@dataclass
class AttackConfig:
    """Malicious clients, by attack name (`none` by default); each attack subclasses
    this with its own settings."""

    name: str = "none"
    fraction: float = field(default=0.0, metadata=UNIT_INTERVAL_CLOSED)  # of the clients
    # run: a fixed set of round(fraction * K) clients; round: round(fraction * cohort) drawn anew each round
    per: Literal["run", "round"] = "run"


@dataclass
class AlgorithmConfig:
    """The federated algorithm, by name; each algorithm subclasses this with its own
    hyperparameters (`FedProxConfig` adds mu), and its file registers the pair."""

    name: str = "fedavg"
    plugin: str | None = None  # a module to import first, which registers more algorithms


@dataclass
class ServerOptimizerConfig:
    """How the server applies the cohort's averaged update (Reddi et al. 2021): by name,
    each optimizer subclassing this with its own settings."""

    name: str = "sgd"
    lr: float = field(default=1.0, metadata=POSITIVE)  # eta; sgd at 1.0 is plain FedAvg


@dataclass
class AggregatorConfig:
    """How the clients' updates are combined: `mean` (weighted, streamed) or one that
    needs every update at once (`median`, `krum`, ...); robust ones subclass this with
    their settings and override `problem`."""

    name: str = "mean"

    def problem(self, cohort: int) -> tuple[str, str] | None:
        """(key, text) when this aggregator cannot combine `cohort` updates, e.g. Krum's
        f too large for it; None when it can. Checked at load time for the cohort size
        the federation samples (see `_check_aggregator` in `fltool.config.load`)."""
        return None


@dataclass
class CompressionConfig:
    """How clients encode their uploads, by name (`none` by default); each compressor
    subclasses this with its own settings."""

    name: str = "none"


@dataclass
class DPConfig:
    """User-level differential privacy of the clients' updates (McMahan et al. 2018)."""

    # central: clients' updates clipped, Gaussian noise on their sum (a trusted server);
    # local: each client clips and noises its own upload (an untrusted server)
    mode: Literal["none", "central", "local"] = "none"
    clip_norm: float = field(default=1.0, metadata=POSITIVE)  # S, on each client's whole update
    # z: the noise std is z * S; null: calibrated from target_epsilon over federated.rounds
    noise_multiplier: float | None = field(default=None, metadata=NOISE_MULTIPLIER)
    target_epsilon: float | None = field(default=None, metadata=POSITIVE)
    delta: float | None = field(default=None, metadata=_check(lambda v: 0 < v < 1, "in (0, 1)"))  # null: 1 / K^1.1
    max_epsilon: float | None = field(default=None, metadata=POSITIVE)  # stop before a round would exceed it
    accountant: Literal["rdp", "pld"] = "rdp"
    # adaptive clipping (Andrew et al. 2021): S follows the target quantile of the update norms
    adaptive_clipping: bool = False
    target_quantile: float = field(default=0.5, metadata=_check(lambda v: 0 < v < 1, "in (0, 1)"))
    clip_lr: float = field(default=0.2, metadata=POSITIVE)  # eta_C, geometric update of S
    # std of the noise on the count of unclipped clients; null: expected cohort / 20 (the paper's)
    count_noise: float | None = field(default=None, metadata=_check(lambda v: 0 < v <= 1e6, "in (0, 1e6]"))
    # seeded: reproducible noise (research); os: the OS CSPRNG, reproducibility given up
    noise_source: Literal["seeded", "os"] = "seeded"
    # central mode: who adds the Gaussian noise. server: to the unmasked sum (a server trusted
    # with it); clients: each its share before secagg masks it (distributed DP, needs secagg)
    noise_placement: Literal["server", "clients"] = "server"


@dataclass
class SecAggConfig:
    """Secure aggregation (SecAgg+, Bell et al. 2020; `fltool.algorithms.secagg`): the
    server sees only masked, quantised uploads and learns their weighted sum."""

    enabled: bool = False
    graph: Literal["k_regular", "complete"] = "k_regular"  # SecAgg+ or the original SecAgg
    num_shares: int | None = field(default=None, metadata=AT_LEAST_ONE)  # k neighbours; null: ~3 log2(cohort)
    # t shares reconstruct a secret; null: a third of the k + 1 shareholders (at least 2)
    reconstruction_threshold: int | None = field(default=None, metadata=_check(lambda v: v >= 2, ">= 2"))
    # the fewest masked inputs the server may unmask a sum of (fewer abort the round); null: t.
    # Distributed DP sizes each client's noise by it, so a higher floor means less excess noise
    min_inputs: int | None = field(default=None, metadata=_check(lambda v: v >= 2, ">= 2"))
    clipping_range: float = field(default=8.0, metadata=POSITIVE)  # each coordinate clipped to [-c, c]
    quantization_range: int = field(default=2**22, metadata=_check(lambda v: v >= 2, ">= 2"))
    modulus_bits: int = field(default=32, metadata=_check(lambda v: 8 <= v <= 32, "in [8, 32] (the PRG gives 32-bit words)"))
    # probability that a client drops after sharing keys (recovered through its neighbours' shares)
    dropout: float = field(default=0.0, metadata=UNIT_INTERVAL_CLOSED)


# sections whose class is chosen by their `name` key (see `fltool.config.registry`)
REGISTRY_SECTIONS = {
    "algorithm": "ALGORITHMS",
    "server_optimizer": "SERVER_OPTIMIZERS",
    "aggregator": "AGGREGATORS",
    "attack": "ATTACKS",
    "compression": "COMPRESSORS",
}


def _chosen(section: str, name: str):
    """A default that is the registered class of `name` (sgd's has its momentum), so a
    `Config()` built in code equals the defaults a YAML file gets."""
    from fltool.config import registry

    return field(default_factory=lambda: getattr(registry, REGISTRY_SECTIONS[section]).config_class(name)())


@dataclass
class DDPConfig:
    epochs: int = field(default=1, metadata=AT_LEAST_ONE)
    batch_size: int = field(default=64, metadata=AT_LEAST_ONE)  # per rank
    lr: float = field(default=0.01, metadata=POSITIVE)
    optimizer: Literal["sgd", "momentum", "adamw"] = "sgd"
    momentum: float = field(default=0.9, metadata=_check(lambda v: 0 <= v < 1, "in [0, 1)"))
    weight_decay: float = field(default=0.0, metadata=NON_NEGATIVE)
    warmup_steps: int = field(default=0, metadata=NON_NEGATIVE)
    schedule: Literal["constant", "cosine"] = "constant"
    grad_accum_steps: int = field(default=1, metadata=AT_LEAST_ONE)
    amp: Literal["none", "bf16"] = "none"
    compile: bool = False
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    # process-group timeout; at most a year: timedelta and torch's int milliseconds overflow not far above
    timeout_s: int = field(default=300, metadata=_check(lambda v: 1 <= v <= 31_536_000, "in [1, 31536000] (a year)"))


@dataclass
class EvalConfig:
    every: int = field(default=1, metadata=AT_LEAST_ONE)  # rounds (or epochs for ddp)
    batch_size: int = field(default=1000, metadata=AT_LEAST_ONE)
    target_accuracy: float | None = field(default=None, metadata=PERCENT)


@dataclass
class OutputConfig:
    dir: str = "runs"
    run_dir: str | None = None  # exact run directory; default <dir>/<name>/<timestamp>
    checkpoint_every: int = field(default=1, metadata=AT_LEAST_ONE)
    tensorboard: bool = False  # scalars and hyperparameters into <run_dir>/tensorboard/ (needs tensorboard)


@dataclass
class Config:
    # a path component of the run directory, runs/<name>/<timestamp>
    name: str = field(
        default="experiment",
        metadata=_check(lambda v: v not in ("", ".", "..") and not set("/\\") & set(v), "a non-empty name without '/' or '\\'"),
    )
    mode: Mode = "federated"
    seed: int = field(default=0, metadata=_check(lambda v: 0 <= v < 2**63, "in [0, 2**63)"))  # torch's seed range
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    algorithm: AlgorithmConfig = _chosen("algorithm", "fedavg")
    server_optimizer: ServerOptimizerConfig = _chosen("server_optimizer", "sgd")
    aggregator: AggregatorConfig = _chosen("aggregator", "mean")
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    attack: AttackConfig = _chosen("attack", "none")
    dp: DPConfig = field(default_factory=DPConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    compression: CompressionConfig = _chosen("compression", "none")
    ddp: DDPConfig = field(default_factory=DDPConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
