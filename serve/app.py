"""The Ray Serve application: a FastAPI ingress deployment in front of the FA Pool cluster.

`serve run deploy/serve_config.yaml` and `fapool serve` both build it with `build_app(args)`.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from ray import serve

from serve.errors import install_handlers
from serve.guard import Guard, set_body_read_timeout
from serve.history import history
from serve.ingress import bind_replica_grpc_to_node_ip
from serve.openapi import install_openapi
from serve.options import ServeOptions
from serve.routes.docs import router as docs_router
from serve.routes.generate import router as generate_router
from serve.routes.openai import router as openai_router
from serve.routes.ops import router as ops_router
from serve.routes.tokens import router as tokens_router
from serve.service import InferenceService, guard_settings, set_current


def create_app() -> FastAPI:
    app = FastAPI(title="FA Pool", version="0.1.0", docs_url=None, redoc_url=None)  # served offline: serve/routes/docs.py
    app.add_middleware(Guard, settings=guard_settings)
    install_handlers(app)
    for router in (generate_router, openai_router, tokens_router, ops_router, docs_router):
        app.include_router(router)
    install_openapi(app)
    return app


app = create_app()


@serve.deployment(name="FAPoolIngress", num_replicas=1, max_ongoing_requests=2048,
                  ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class FAPoolIngress:
    def __init__(self, options: dict[str, Any]) -> None:
        bind_replica_grpc_to_node_ip()
        opts = ServeOptions(**options)
        set_body_read_timeout(opts.body_read_timeout_s)
        self.service = InferenceService(opts.cluster_config(), opts.limits(), opts.model_names())
        set_current(self.service, opts.resolved_api_key())
        history.start(self.service.pool_json)  # Serve runs __init__ on the replica's event loop


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for `serve run`/`serve deploy`: `args` are the CLI flags in snake_case."""
    opts = ServeOptions(**(args or {}))
    return FAPoolIngress.bind(opts.model_dump())
