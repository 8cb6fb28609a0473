"""What FastAPI's routing costs a decision and a feature lookup: ``POST /v1/decisions`` and
``POST /get-online-features`` through the serving app's real middleware stack (Guard, every
route registered as in a replica), by FastAPI's routes and by the fast routes
(``mlplatform.serving.fast_routes``), interleaved in one process, without Ray or sockets.

    python benchmarks/fast_routes.py                 # 3 rounds of 4,000 requests each way
    python benchmarks/fast_routes.py --rounds 5 --requests 10000

Both ways end in a handler that returns the same fixed response (the replica's ``decide`` and
``get_online_features`` are swapped for it, and FastAPI's ``self`` dependency answered by a
stand-in), so the difference is the routing alone: Guard's key check, the body's JSON and the
request schema are in both.
Prints the CPU time of this process per request, and checks both ways answer byte for byte alike.
"""

import argparse
import asyncio
import hashlib
import json
import time
from datetime import UTC, datetime

KEY = "bench-" + "k" * 32
RESPONSE = json.dumps({"decision_id": "d" * 32, "application_id": "app-1", "decision": "approve",
                       "probability_of_default": 0.0281, "reasons": [], "model": {"name": "underwriting", "version": 1},
                       "fallback": False, "fallback_reason": None}).encode()


async def fixed(self, body):
    """What both ways end in (runs with the replica module's globals, given Response and RESPONSE)."""
    return Response(RESPONSE, media_type="application/json")  # noqa: F821


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=4000)
    args = parser.parse_args()

    import ray.serve
    from fastapi.responses import Response

    import mlplatform.serving.app as replica_module  # registers every route on the shared app
    from mlplatform.serving.fast_routes import FastRoutes
    from mlplatform.serving.guard import Guard
    from mlplatform.serving.http import app
    from mlplatform.serving.schemas import DecisionRequest, FeatureRequest

    class Servable:
        async def decide(self, body):
            return Response(RESPONSE, media_type="application/json")

        get_online_features = decide

    class Context:  # FastAPI's route asks Serve for the replica object (its ``self``)
        servable_object = Servable()

    ray.serve.get_replica_context = lambda: Context
    for name in ("decide", "get_online_features"):
        getattr(replica_module.ServingReplica, name).__code__ = fixed.__code__
    replica_module.ServingReplica.decide.__globals__.update(Response=Response, RESPONSE=RESPONSE)
    Guard.configure(((hashlib.sha256(KEY.encode()).hexdigest(), ("decide", "read_features")),))
    stack = app.build_middleware_stack()
    servable = Servable()
    fast = {"/v1/decisions": (DecisionRequest, servable.decide), "/get-online-features": (FeatureRequest, servable.get_online_features)}
    bodies = {
        "/v1/decisions": json.dumps({"application_id": "app-1", "applicant_id": 42, "merchant_id": 7, "amount": 120.5,
                                     "currency": "USD", "term": 4, "timestamp": datetime.now(UTC).isoformat()}).encode(),
        "/get-online-features": json.dumps({"feature_service": "underwriting_v1",
                                            "entities": {"applicant_id": [1], "merchant_id": [7]}}).encode(),
    }

    async def one(path: str) -> tuple[int, list, bytes]:
        body = bodies[path]
        headers = [(b"content-type", b"application/json"), (b"x-api-key", KEY.encode()), (b"content-length", str(len(body)).encode())]
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        sent = []

        async def receive():
            return messages.pop() if messages else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        await stack(scope, receive, send)
        return sent[0]["status"], sorted(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])

    async def many(path: str, n: int) -> tuple[int, list, bytes]:
        for _ in range(n):
            out = await one(path)
        return out

    answers = {}
    for _ in range(args.rounds):
        for path in bodies:
            for way, routes in (("FastAPI route", {}), ("fast route", fast)):
                FastRoutes.serve(routes)
                asyncio.run(many(path, 300))
                cpu = time.process_time()
                answers[path, way] = asyncio.run(many(path, args.requests))
                cpu = time.process_time() - cpu
                print(f"{path:21s} {way:13s}: {cpu / args.requests * 1e6:7.1f} us CPU a request (status {answers[path, way][0]})",
                      flush=True)
    for path in bodies:
        if answers[path, "FastAPI route"] != answers[path, "fast route"]:
            raise SystemExit(f"the two ways answered {path} differently: {answers}")
    print("both ways answered byte for byte alike")


if __name__ == "__main__":
    main()
