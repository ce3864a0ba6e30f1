"""One gateway replica (``fleetgate serve``): the Starlette app, the raw-ASGI proxy handler, the
per-request exchange (one attempt, the retry loop), DistServe, routing, the upstream HTTP client
(the only one in the replica), the node API, auth, errors, settings and the hypercorn server.
It never imports the checker, the ops CLI or the simulated nodes."""
