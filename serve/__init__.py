"""The HTTP front door: Ray Serve + FastAPI ingress, OpenAI-compatible routes, metrics, dashboard, CLI."""
