"""`tokenmill gateway`: from a YAML config, or the quick form with --replica URLs or --local-replicas N (one pool)."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from typing import Annotated

import typer


def build_config(config: Path | None, replica: list[str] | None, policy: str | None, host: str | None,
                 port: int | None, max_concurrency: int | None, drain_timeout: float | None = None,
                 local_replicas: int | None = None, model: str | None = None, serve_args: str | None = None):
    """The GatewayConfig the command would run (ValueError naming the option on bad input)."""
    from tokenmill.gateway.config import (
        GatewayConfig,
        PoolConfig,
        ReplicaConfig,
        load_config,
    )

    if config is not None:
        if replica:
            raise ValueError("--replica: not allowed together with --config; list replicas in the config file")
        if local_replicas is not None:
            raise ValueError("--local-replicas: not allowed together with --config; use a pool's spec + autoscale")
        cfg = load_config(config)
        if policy or max_concurrency:
            pools = tuple(dataclasses.replace(p, policy=policy or p.policy,
                                              max_concurrency=max_concurrency or p.max_concurrency) for p in cfg.pools)
            cfg = dataclasses.replace(cfg, pools=pools)
    elif local_replicas is not None:
        if replica:
            raise ValueError("--local-replicas: not allowed together with --replica; use one or the other")
        cfg = GatewayConfig(pools=(_local_pool(local_replicas, model, serve_args, policy, max_concurrency),))
    else:
        if not replica:
            raise ValueError("--replica: give at least one replica URL (repeatable), --local-replicas N, "
                             "or --config gateway.yaml")
        pool = PoolConfig(name="default", policy=policy or "least-outstanding",
                          replicas=tuple(ReplicaConfig(url=u) for u in replica),
                          max_concurrency=max_concurrency or 32)
        cfg = GatewayConfig(pools=(pool,))
    return dataclasses.replace(cfg, host=host or cfg.host, port=port or cfg.port,
                               drain_timeout_s=cfg.drain_timeout_s if drain_timeout is None else drain_timeout)


def _local_pool(n: int, model: str | None, serve_args: str | None, policy: str | None,
                max_concurrency: int | None):
    """A pool of exactly n `tokenmill serve` processes on this machine, each on its own share of the cores
    (the local actuator passes --cpu-cores: replicas that all use every core fight for them)."""
    from tokenmill.gateway.config import AutoscaleConfig, PoolConfig, ReplicaSpec

    if n < 1:
        raise ValueError(f"--local-replicas: {n} is not allowed; must be >= 1")
    try:
        extra = shlex.split(serve_args or "")
    except ValueError as e:
        raise ValueError(f"--serve-args: {serve_args!r} does not parse as shell words ({e})") from None
    if any(a.partition("=")[0] == "--cpu-cores" for a in extra):
        raise ValueError("--serve-args: leave out --cpu-cores; --local-replicas gives each replica its own cores")
    # A command (not spec.model) so that MODEL may be omitted: `tokenmill serve` then serves the default model.
    escaped = [a.replace("{", "{{").replace("}", "}}") for a in extra]
    command = ("{python}", "-m", "tokenmill.cli", "serve", *([model] if model else []), "--host", "{host}",
               "--port", "{port}", "--cpu-cores", "{cpu_cores}", *escaped)
    return PoolConfig(name="default", policy=policy or "least-outstanding", max_concurrency=max_concurrency or 32,
                      spec=ReplicaSpec(command=command), autoscale=AutoscaleConfig(min_replicas=n, max_replicas=n))


def _replicas_text(pool) -> str:
    """For the start line; a fixed-size local pool (what --local-replicas N makes) says its replicas are pinned."""
    a, spec = pool.autoscale, pool.spec
    if a is not None and spec is not None and spec.actuator == "local" and a.min_replicas == a.max_replicas:
        return f"{a.max_replicas} local replicas, each on its own cores"
    return f"{len(pool.replicas)} replicas{', autoscaled' if a else ''}"


def gateway_command(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Gateway YAML config (see docs/gateway.md).")] = None,
    replica: Annotated[list[str] | None, typer.Option(
        "--replica", help="Replica base URL, e.g. http://127.0.0.1:8001 (repeatable). Quick form: one pool, "
                          "model names taken from the replicas' /v1/models.")] = None,
    policy: Annotated[str | None, typer.Option(
        help="Load balancing: round-robin | least-outstanding | power-of-two | affinity "
             "(default least-outstanding; with --config, overrides every pool's policy).")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1, or the config's).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 9000, or the config's).")] = None,
    max_concurrency: Annotated[int | None, typer.Option(
        help="In-flight requests per replica before requests queue at the gateway (default 32).")] = None,
    local_replicas: Annotated[int | None, typer.Option(
        help="Quick form: start N `tokenmill serve` replicas on this machine, each pinned to its own share of "
             "the cores (not with --replica or --config).")] = None,
    model: Annotated[str | None, typer.Option(
        help="With --local-replicas: the model each replica serves (default: the packaged default model).")] = None,
    serve_args: Annotated[str | None, typer.Option(
        help="With --local-replicas: extra `tokenmill serve` flags, e.g. '--kv-cache-memory 0.5'.")] = None,
    drain_timeout: Annotated[float | None, typer.Option(
        help="After SIGTERM/SIGINT: seconds in-flight requests may take to finish while new ones get 503 "
             "(default 30, or the config's drain_timeout_s).")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Run the gateway: an OpenAI-compatible reverse proxy with load balancing, queueing, routing, autoscaling."""
    import logging

    import uvicorn
    from prometheus_client import CollectorRegistry

    from tokenmill.gateway.app import create_app
    from tokenmill.gateway.drain import DrainingServer

    try:
        cfg = build_config(config, replica, policy, host, port, max_concurrency, drain_timeout, local_replicas,
                           model, serve_args)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(cfg, CollectorRegistry())
    pools = ", ".join(f"{p.name} ({p.policy}, {_replicas_text(p)})" for p in cfg.pools)
    typer.echo(f"tokenmill gateway on http://{cfg.host}:{cfg.port}  pools: {pools}")
    # The drain already waited for in-flight requests; uvicorn's own grace only covers a forced stop.
    server = DrainingServer(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=log_level,
                                           timeout_graceful_shutdown=1), app.state.gateway.drain, cfg.drain_timeout_s)
    server.run()
    # Exit 0 (not -15): the shutdown was the one asked for. The lifespan has stopped managed replicas.
