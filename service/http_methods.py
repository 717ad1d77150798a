"""HEAD and OPTIONS on every route: load balancers and uptime checks send HEAD, and OPTIONS answers with the
route's methods. Both answered 405 before (FastAPI adds neither). A CORS preflight stays refused: the service
serves no cross-origin reads."""

from __future__ import annotations

from typing import Any, Callable

from starlette.routing import Match


class ProbeMethods:
    """ASGI middleware. HEAD runs the GET route (uvicorn, whose scope still says HEAD, sends the headers without
    the body), behind the same access check; OPTIONS gets 204 with `Allow`, naming no more than the methods."""

    def __init__(self, app: Any, routes: list) -> None:
        self.app, self.routes = app, routes

    def allowed(self, scope: dict) -> set[str]:
        methods: set[str] = set()
        for route in self.routes:
            match, _ = route.matches({**scope, "method": "GET"})
            if match is not Match.NONE:
                methods |= set(getattr(route, "methods", None) or {"GET"})  # a mount (static files) serves GET
        if "GET" in methods:
            methods.add("HEAD")
        return methods

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["method"] in ("HEAD", "OPTIONS"):
            allowed = self.allowed(scope)
            if scope["method"] == "HEAD" and "GET" in allowed:
                return await self.app({**scope, "method": "GET"}, receive, send)
            preflight = any(name == b"access-control-request-method" for name, _ in scope.get("headers") or ())
            if scope["method"] == "OPTIONS" and allowed and not preflight:
                allow = ", ".join(sorted(allowed | {"OPTIONS"})).encode()
                await send({"type": "http.response.start", "status": 204, "headers": [(b"allow", allow)]})
                return await send({"type": "http.response.body", "body": b""})
        await self.app(scope, receive, send)
