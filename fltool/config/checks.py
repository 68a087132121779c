"""Rules that involve more than one field of a built `Config` (cohort sizes against
robust aggregators, DP and SecAgg combinations, sizes known before any data loads).
Each appends one line per problem, naming where the key was set."""

from __future__ import annotations

import math
from collections.abc import Callable

from fltool.config import registry
from fltool.config.messages import show
from fltool.config.schema import Config, SyntheticConfig

MNIST_TRAIN_SIZE = 60_000  # MNIST and FashionMNIST alike
# Values in one synthetic tensor (train set, test set, class prototypes): 8 GiB of float32.
SYNTHETIC_MAX_VALUES = 2**31


def cross_checks(cfg: Config, source: Callable[[str], str], errors: list[str]) -> None:
    """Rules that involve more than one field; `source(key)` names where a key was set."""
    shape = cfg.data.synthetic.shape
    if cfg.data.dataset == "synthetic" and any(s < 1 for s in shape):
        errors.append(f"{source('data.synthetic.shape')}: data.synthetic.shape: every dimension must be >= 1")
    if cfg.data.dataset == "synthetic" and len(shape) != 3:
        errors.append(f"{source('data.synthetic.shape')}: data.synthetic.shape: must be [channels, height, width]")
    if cfg.data.dataset == "synthetic" and len(shape) == 3 and all(s >= 1 for s in shape):
        _check_synthetic_size(cfg.data.synthetic, source, errors)
    for section in ("data", "model"):
        part = getattr(cfg, section)
        if part.init_args and not part.class_path:  # else ignored: a typo'd experiment that runs anyway
            builtin = part.dataset if section == "data" else part.name
            errors.append(
                f"{source(f'{section}.init_args')}: {section}.init_args: only {section}.class_path takes arguments; "
                f"the built-in {builtin} takes none"
            )
    if cfg.data.partition == "natural" and not cfg.data.class_path:
        errors.append(
            f"{source('data.partition')}: data.partition: natural needs each example's client id, "
            "which only a data.class_path dataset gives"
        )
    if cfg.mode == "ddp":
        return
    size = _train_size(cfg)
    if size is None:  # your data (data.class_path): checked once it is loaded
        pass
    elif cfg.federated.num_clients > size:
        errors.append(
            f"{source('federated.num_clients')}: federated.num_clients: {cfg.federated.num_clients} clients "
            f"exceed the {size} training examples"
        )
    elif cfg.data.partition == "shards" and cfg.federated.num_clients * cfg.data.shards_per_client > size:
        shards = cfg.federated.num_clients * cfg.data.shards_per_client
        errors.append(
            f"{source('data.shards_per_client')}: data.shards_per_client: {shards} shards exceed the {size} training examples"
        )
    cohort = max(1, round(cfg.federated.fraction * cfg.federated.num_clients))
    _check_clients(cfg, source, errors, cohort)
    faults = cfg.clients
    may_shrink = (
        faults.dropout > 0 or (faults.stragglers > 0 and faults.straggler_policy == "drop") or cfg.federated.sampling == "poisson"
    )
    # where clients may not return (or a Poisson cohort is small), a round goes ahead with as few as min_returned
    _check_aggregator(cfg, source, errors, min(cohort, faults.min_returned) if may_shrink else cohort)
    if cfg.dp.mode != "none":
        _check_dp(cfg, source, errors)
    if cfg.secagg.enabled:
        _check_secagg(cfg, source, errors, cohort)
    if cfg.dp.noise_placement == "clients":
        _check_distributed_dp(cfg, source, errors)


def _train_size(cfg: Config) -> int | None:
    """Training examples of the configured dataset, known without loading it."""
    from fltool.data.vision import VISION

    if cfg.data.class_path:
        return None
    if cfg.data.dataset == "synthetic":
        return cfg.data.synthetic.train_size
    return VISION[cfg.data.dataset].train_size if cfg.data.dataset in VISION else MNIST_TRAIN_SIZE


def _check_dp(cfg: Config, source: Callable[[str], str], errors: list[str]) -> None:
    """DP settings that cannot give the guarantee they ask for."""
    dp, fed = cfg.dp, cfg.federated

    def error(key: str, text: str) -> None:
        errors.append(f"{source(key)}: {key}: {text}")

    if (dp.noise_multiplier is None) == (dp.target_epsilon is None):
        key = "dp.mode" if dp.noise_multiplier is None else "dp.target_epsilon"
        error(key, f"dp.mode {dp.mode} needs exactly one of dp.noise_multiplier and dp.target_epsilon (which calibrates it)")
    if dp.mode == "central" and cfg.aggregator.name != "mean":
        error("aggregator.name", f"dp.mode central noises the clipped sum: it needs aggregator mean, got {cfg.aggregator.name!r}")
    if cfg.algorithm.name in registry.ALGORITHMS.names() and registry.ALGORITHMS.get(cfg.algorithm.name).uploads_extras:
        error("algorithm.name", f"{cfg.algorithm.name} uploads extras (control variates, step counts) that dp does not protect; "
              "use an algorithm without, e.g. fedavg or fedprox")
    adaptive_ok = dp.mode == "central" and fed.sampling == "poisson"
    if dp.adaptive_clipping and not adaptive_ok:
        error("dp.adaptive_clipping", "needs dp.mode central and federated.sampling poisson (its accounting assumes both)")
    if dp.accountant == "pld" and dp.mode == "central" and fed.sampling != "poisson":
        error("dp.accountant", "pld accounts for Poisson sampling only: set federated.sampling poisson, or use rdp")
    z = dp.noise_multiplier
    if dp.adaptive_clipping and adaptive_ok and z:  # (a calibrated z is checked once known, before training)
        count_noise = dp.count_noise if dp.count_noise is not None else fed.fraction * fed.num_clients / 20
        if 2 * count_noise <= z:
            key = "dp.count_noise" if dp.count_noise is not None else "dp.noise_multiplier"
            error(key, f"count noise {count_noise:g} leaves no noise for the update: adaptive clipping needs 2 * dp.count_noise > z = {z:g}")


def _check_secagg(cfg: Config, source: Callable[[str], str], errors: list[str], cohort: int) -> None:
    """Secure aggregation reveals only a sum: what needs more than a sum cannot run on it."""
    sa = cfg.secagg

    def error(key: str, text: str) -> None:
        errors.append(f"{source(key)}: {key}: {text}")

    if cfg.aggregator.name != "mean":
        error("aggregator.name", f"{cfg.aggregator.name} needs the individual updates, which secagg hides from the server: use mean")
    if cfg.compression.name != "none":
        error("compression.name", "the server decodes each client's compressed upload, which secagg hides: use none")
    if cohort * sa.quantization_range >= 1 << sa.modulus_bits:
        error("secagg.quantization_range", f"{cohort} clients x {sa.quantization_range} levels overflow mod 2^{sa.modulus_bits}")
    if cohort < 2:
        error("secagg.enabled", "secure aggregation of a single client reveals its update: the cohort needs >= 2 clients")
    if sa.min_inputs is not None and sa.min_inputs > cohort:
        error("secagg.min_inputs", f"{sa.min_inputs} is more than the {cohort} clients a round samples: no round could be unmasked")


def _check_distributed_dp(cfg: Config, source: Callable[[str], str], errors: list[str]) -> None:
    """Clients' noise shares protect only a sum the server cannot see through."""
    dp = cfg.dp

    def error(key: str, text: str) -> None:
        errors.append(f"{source(key)}: {key}: {text}")

    if dp.mode != "central":
        error("dp.noise_placement", f"clients splits central DP's noise among the clients; it needs dp.mode central, got {dp.mode!r}")
    elif not cfg.secagg.enabled:
        error("dp.noise_placement", "clients needs secagg.enabled: each client adds only a share of the noise, "
              "so the server must see no update but the secure sum")
    elif dp.adaptive_clipping:
        error("dp.adaptive_clipping", "the count of unclipped clients would be noised by the server alone; "
              "with dp.noise_placement clients use a fixed dp.clip_norm")
    elif dp.noise_multiplier is not None:  # (a calibrated z is checked once known, before training)
        from fltool.algorithms.privacy.mechanism import noise_range_problem

        problem = noise_range_problem(cfg, dp.noise_multiplier)
        if problem:
            error("secagg.clipping_range", problem)


def _check_clients(cfg: Config, source: Callable[[str], str], errors: list[str], cohort: int) -> None:
    """Faults that leave no round able to run."""
    faults = cfg.clients
    if faults.min_returned > cohort:
        errors.append(
            f"{source('clients.min_returned')}: clients.min_returned: {faults.min_returned} is more than the "
            f"{cohort} clients a round samples (federated.fraction x federated.num_clients)"
        )
    if faults.dropout == 1:
        errors.append(f"{source('clients.dropout')}: clients.dropout: 1 means no client ever returns; must be below 1")
    if faults.stragglers == 1 and faults.straggler_policy == "drop":
        errors.append(
            f"{source('clients.stragglers')}: clients.stragglers: 1 with straggler_policy drop discards every client; "
            f"lower it or use straggler_policy partial"
        )


def _check_aggregator(cfg: Config, source: Callable[[str], str], errors: list[str], cohort: int) -> None:
    """The aggregator must be able to combine a cohort of `cohort` updates (Krum needs
    more than f + 2 of them, Bulyan 4f + 3): the sampled cohort, or fewer where clients
    may not return theirs."""
    found = cfg.aggregator.problem(cohort)
    if found is not None:
        key, text = found
        errors.append(f"{source('aggregator.' + key)}: aggregator.{key}: {text}")


def _check_synthetic_size(syn: SyntheticConfig, source: Callable[[str], str], errors: list[str]) -> None:
    """The synthetic set is drawn in one piece per tensor; past a bound torch fails to
    allocate it, or the machine swaps, long after validation."""
    values = math.prod(syn.shape)
    for key in ("train_size", "test_size", "num_classes"):  # num_classes: one prototype each
        n = getattr(syn, key)
        if n * values > SYNTHETIC_MAX_VALUES:
            dotted = f"data.synthetic.{key}"
            errors.append(
                f"{source(dotted)}: {dotted}: {n} x shape {syn.shape} = {show(n * values)} values, more than "
                f"the 2**31 (8 GiB of float32) a synthetic tensor may hold"
            )
