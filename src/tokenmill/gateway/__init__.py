"""tokenmill gateway: OpenAI-compatible reverse proxy with load balancing, queueing, model routing, autoscaling."""
