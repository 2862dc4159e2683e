"""Gateway configuration: frozen dataclasses and YAML loading with errors that name the field."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POLICIES = ("round-robin", "least-outstanding", "power-of-two", "affinity")
ACTUATORS = ("local", "ray")
SCORERS = ("heuristic", "embedding")


@dataclass(frozen=True, slots=True)
class ReplicaConfig:
    """A fixed replica: its base URL (no /v1) and a load-balancing weight."""

    url: str
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class ReplicaSpec:
    """How an actuator starts one replica. `command` overrides `tokenmill serve MODEL ARGS`; it may
    contain {host} and {port}, filled with a free loopback port per replica."""

    actuator: str = "local"
    model: str | None = None
    args: tuple[str, ...] = ()
    command: tuple[str, ...] = ()
    startup_timeout_s: float = 180.0
    drain_timeout_s: float = 60.0
    ray_address: str | None = None  # None: ray.init() a local instance
    ray_num_cpus: float = 1.0  # CPUs reserved for each replica actor


@dataclass(frozen=True, slots=True)
class AutoscaleConfig:
    min_replicas: int = 1  # 0 enables scale-to-zero
    max_replicas: int = 4
    target_queue_per_replica: float = 2.0  # waiting requests per ready replica that trigger a scale-up
    target_outstanding_per_replica: float = 8.0  # in-flight per replica that the pool is sized for
    kv_usage_high: float = 0.85  # scale up when a replica's KV cache is fuller than this
    ttft_target_s: float | None = None  # scale up when the recent TTFT p50 exceeds this
    scale_up_cooldown_s: float = 5.0
    scale_down_cooldown_s: float = 30.0
    idle_to_zero_s: float = 60.0  # with min_replicas 0: idle this long -> 0 replicas
    interval_s: float = 1.0


@dataclass(frozen=True, slots=True)
class PoolConfig:
    name: str
    model: str | None = None  # served model name; None: taken from the replicas' /v1/models
    policy: str = "least-outstanding"
    replicas: tuple[ReplicaConfig, ...] = ()
    max_concurrency: int = 32  # in-flight requests per replica before requests queue at the gateway
    affinity_prefix_chars: int = 256  # prompt characters hashed when there is no x-session-id
    affinity_load_factor: float = 1.25  # bounded load: a replica takes at most this times the mean load
    api_key: str | None = None  # bearer token sent upstream
    spec: ReplicaSpec | None = None
    autoscale: AutoscaleConfig | None = None


@dataclass(frozen=True, slots=True)
class RouteExample:
    text: str
    label: str  # small | large


@dataclass(frozen=True, slots=True)
class EmbeddingScorerConfig:
    url: str  # base URL of an OpenAI-compatible embeddings server
    model: str | None = None
    examples: tuple[RouteExample, ...] = ()
    top_k: int = 3


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """A model alias routed per request to a small or a large pool by complexity score."""

    alias: str
    small: str
    large: str
    threshold: float = 0.5  # score >= threshold -> large
    scorer: str = "heuristic"
    embedding: EmbeddingScorerConfig | None = None


@dataclass(frozen=True, slots=True)
class ApiKeyConfig:
    key: str
    name: str | None = None
    priority: int = 0  # tier, added to the request's priority; lower is served first (vLLM's convention)
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None  # prompt chars/4 + max_tokens, estimated at admission


@dataclass(frozen=True, slots=True)
class QueueConfig:
    max_size: int = 256  # per pool
    max_wait_s: float = 30.0
    priority_header: str = "x-priority"
    retry_after_s: int = 1


@dataclass(frozen=True, slots=True)
class HealthConfig:
    interval_s: float = 2.0
    timeout_s: float = 2.0
    failure_threshold: int = 3  # consecutive failures (active or passive) that eject a replica
    eject_s: float = 3.0  # minimum time out of rotation before a passing check re-admits
    scrape_interval_s: float = 1.0  # replicas' /metrics


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    connect_timeout_s: float = 3.0
    first_byte_timeout_s: float = 120.0  # streams: no first chunk by then -> closed, retried once elsewhere
    read_timeout_s: float = 120.0  # gap between stream chunks before the stream is ended with an error
    # Non-streamed requests send nothing until generation ends, so neither bound above applies to them:
    # only this total (None: unbounded, like the generation's own max_tokens bound). Past it: 504, no retry.
    request_timeout_s: float | None = None
    max_connections: int = 1024


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 9000
    pools: tuple[PoolConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    api_keys: tuple[ApiKeyConfig, ...] = ()
    queue: QueueConfig = field(default_factory=QueueConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    max_body_bytes: int = 8 * 1024 * 1024  # larger request bodies get 413 before anything is forwarded
    drain_timeout_s: float = 30.0  # after SIGTERM: how long in-flight requests may take to finish

    def __post_init__(self) -> None:
        validate(self)


def load_config(path: str | Path) -> GatewayConfig:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config: file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"config: {p} is not valid YAML: {e}") from None
    return config_from_dict(data or {})


def config_from_dict(data: Any) -> GatewayConfig:
    return _build(GatewayConfig, data, "")


def _build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from plain YAML data, checking names and types field by field."""
    if cls is ReplicaConfig and isinstance(data, str):
        data = {"url": data}
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{where or 'config'}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(names)}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"{where or 'config'}: {e}") from None


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {type(value).__name__}")
        item = typing.get_args(tp)[0]
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)
    if tp is bool and isinstance(value, bool):
        return value
    raise ValueError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _require(ok: bool, where: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{where}: {value!r} is not allowed; expected {allowed}")


def validate(cfg: GatewayConfig) -> None:
    """Cross-field checks; each error names the field, the bad value and what is allowed."""
    _require(1 <= cfg.port <= 65535, "port", cfg.port, "1..65535")
    names: set[str] = set()
    for i, p in enumerate(cfg.pools):
        w = f"pools[{i}]"
        _require(bool(p.name) and p.name not in names, f"{w}.name", p.name, "a unique non-empty name")
        names.add(p.name)
        _require(p.policy in POLICIES, f"{w}.policy", p.policy, " | ".join(POLICIES))
        _require(p.max_concurrency >= 1, f"{w}.max_concurrency", p.max_concurrency, ">= 1")
        _require(p.affinity_load_factor >= 1.0, f"{w}.affinity_load_factor", p.affinity_load_factor, ">= 1.0")
        for j, r in enumerate(p.replicas):
            _require(r.url.startswith(("http://", "https://")), f"{w}.replicas[{j}].url", r.url, "an http(s) URL")
            _require(r.weight > 0, f"{w}.replicas[{j}].weight", r.weight, "> 0")
        if p.autoscale is not None:
            a = p.autoscale
            _require(p.spec is not None, f"{w}.spec", None, "a replica spec when autoscale is set")
            _require(a.min_replicas >= 0, f"{w}.autoscale.min_replicas", a.min_replicas, ">= 0")
            _require(a.max_replicas >= max(1, a.min_replicas), f"{w}.autoscale.max_replicas", a.max_replicas,
                     ">= max(1, min_replicas)")
            _require(a.target_queue_per_replica > 0, f"{w}.autoscale.target_queue_per_replica",
                     a.target_queue_per_replica, "> 0")
            _require(a.target_outstanding_per_replica > 0, f"{w}.autoscale.target_outstanding_per_replica",
                     a.target_outstanding_per_replica, "> 0")
        elif not p.replicas and p.spec is None:
            _require(False, f"{w}.replicas", [], "at least one replica URL, or spec + autoscale")
        if p.spec is not None:
            _require(p.spec.actuator in ACTUATORS, f"{w}.spec.actuator", p.spec.actuator, " | ".join(ACTUATORS))
            _require(p.spec.model is not None or bool(p.spec.command), f"{w}.spec.model", None,
                     "a model path/name, or a command")
    _require(bool(cfg.pools), "pools", [], "at least one pool")
    for i, r in enumerate(cfg.routes):
        w = f"routes[{i}]"
        _require(r.alias not in names, f"{w}.alias", r.alias, "a name that is not also a pool name")
        _require(r.small in names, f"{w}.small", r.small, f"a pool name ({', '.join(sorted(names))})")
        _require(r.large in names, f"{w}.large", r.large, f"a pool name ({', '.join(sorted(names))})")
        _require(r.scorer in SCORERS, f"{w}.scorer", r.scorer, " | ".join(SCORERS))
        _require(0.0 <= r.threshold <= 1.0, f"{w}.threshold", r.threshold, "in [0, 1]")
        if r.scorer == "embedding":
            _require(r.embedding is not None and bool(r.embedding.examples), f"{w}.embedding", r.embedding,
                     "an embedding section with labelled examples")
            for j, ex in enumerate(r.embedding.examples):  # type: ignore[union-attr]
                _require(ex.label in ("small", "large"), f"{w}.embedding.examples[{j}].label", ex.label,
                         "small | large")
    keys: set[str] = set()
    for i, k in enumerate(cfg.api_keys):
        _require(bool(k.key) and k.key not in keys, f"api_keys[{i}].key", "***", "a unique non-empty key")
        keys.add(k.key)
        for fname in ("requests_per_minute", "tokens_per_minute"):
            v = getattr(k, fname)
            _require(v is None or v > 0, f"api_keys[{i}].{fname}", v, "a positive integer or null")
    _require(cfg.queue.max_size >= 0, "queue.max_size", cfg.queue.max_size, ">= 0")
    _require(cfg.queue.max_wait_s > 0, "queue.max_wait_s", cfg.queue.max_wait_s, "> 0")
    _require(cfg.drain_timeout_s >= 0, "drain_timeout_s", cfg.drain_timeout_s, ">= 0 seconds")
    up = cfg.upstream
    _require(up.request_timeout_s is None or up.request_timeout_s > 0, "upstream.request_timeout_s",
             up.request_timeout_s, "> 0 seconds, or null for no limit")
    _require(cfg.health.failure_threshold >= 1, "health.failure_threshold", cfg.health.failure_threshold, ">= 1")
