"""Live dashboard: a self-contained HTML page and its JSON stats, mounted by the server and the gateway."""
