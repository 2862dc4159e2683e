"""`tokenmill gateway`: from a YAML config, or the quick form with --replica URLs (one pool)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer


def build_config(config: Path | None, replica: list[str] | None, policy: str | None, host: str | None,
                 port: int | None, max_concurrency: int | None, drain_timeout: float | None = None):
    """The GatewayConfig the command would run (ValueError naming the option on bad input)."""
    from tokenmill.gateway.config import GatewayConfig, PoolConfig, ReplicaConfig, load_config

    if config is not None:
        if replica:
            raise ValueError("--replica: not allowed together with --config; list replicas in the config file")
        cfg = load_config(config)
        if policy or max_concurrency:
            pools = tuple(dataclasses.replace(p, policy=policy or p.policy,
                                              max_concurrency=max_concurrency or p.max_concurrency) for p in cfg.pools)
            cfg = dataclasses.replace(cfg, pools=pools)
    else:
        if not replica:
            raise ValueError("--replica: give at least one replica URL (repeatable), or --config gateway.yaml")
        pool = PoolConfig(name="default", policy=policy or "least-outstanding",
                          replicas=tuple(ReplicaConfig(url=u) for u in replica),
                          max_concurrency=max_concurrency or 32)
        cfg = GatewayConfig(pools=(pool,))
    return dataclasses.replace(cfg, host=host or cfg.host, port=port or cfg.port,
                               drain_timeout_s=cfg.drain_timeout_s if drain_timeout is None else drain_timeout)


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
        cfg = build_config(config, replica, policy, host, port, max_concurrency, drain_timeout)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(cfg, CollectorRegistry())
    pools = ", ".join(f"{p.name} ({p.policy}, {len(p.replicas)} replicas{', autoscaled' if p.autoscale else ''})"
                      for p in cfg.pools)
    typer.echo(f"tokenmill gateway on http://{cfg.host}:{cfg.port}  pools: {pools}")
    # The drain already waited for in-flight requests; uvicorn's own grace only covers a forced stop.
    server = DrainingServer(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=log_level,
                                           timeout_graceful_shutdown=1), app.state.gateway.drain, cfg.drain_timeout_s)
    server.run()
    # Exit 0 (not -15): the shutdown was the one asked for. The lifespan has stopped managed replicas.
