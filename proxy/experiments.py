"""Experiments resolved for the hot path: alias -> Experiment, each arm fully resolved.

Config keeps references by name (`control: base`); resolving them once at start-up means a
request does one dict lookup to learn the salt and both arms' upstream, model id and pricing.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.assignment import Variant
from proxy.config import Pricing, Settings


@dataclass(frozen=True, slots=True)
class Arm:
    variant: Variant
    model_key: str  # the config name, e.g. "finetuned"
    upstream: str
    upstream_model: str  # the id sent upstream, e.g. "ft:gpt-4o-mini:acme:sales-v2:abc123"
    pricing: Pricing


@dataclass(frozen=True, slots=True)
class Experiment:
    name: str
    salt: str
    aliases: tuple[str, ...]
    control: Arm
    treatment: Arm
    default_percent: float
    store_prompts: bool  # prompts and answers go into its events (and the store): off by default
    pair_share: float  # share of requests also sent to the other variant (proxy/pair_sampling.py)
    pair_max_in_flight: int
    fallback_to_control: bool  # a failed treatment call is answered by the control (counted, marked)

    def arm(self, variant: Variant) -> Arm:
        return self.treatment if variant == "treatment" else self.control


class Router:
    """Which experiment routes an incoming `model` value."""

    def __init__(self, settings: Settings) -> None:
        self.experiments: dict[str, Experiment] = {}
        for name, cfg in settings.experiments.items():
            arms = {}
            for variant, key in (("control", cfg.control), ("treatment", cfg.treatment)):
                model = settings.models[key]
                arms[variant] = Arm(variant, key, model.upstream, model.model, model.pricing)  # type: ignore[arg-type]
            self.experiments[name] = Experiment(
                name, cfg.salt or name, tuple(cfg.aliases), arms["control"], arms["treatment"], cfg.rollout_percent,
                cfg.analysis.store_prompts, cfg.pair_sampling.share, cfg.pair_sampling.max_in_flight,
                cfg.fallback_to_control,
            )
        self.by_alias: dict[str, Experiment] = {
            alias: exp for exp in self.experiments.values() for alias in exp.aliases
        }

    def defaults(self) -> dict[str, float]:
        return {name: exp.default_percent for name, exp in self.experiments.items()}
