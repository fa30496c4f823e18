"""vinterp's OpenAI-compatible intervention server.

How it fits together (one topic a module):

* ``serve`` — ``vinterp serve``: options, keys, the uvicorn loop.
* ``app`` — the FastAPI app around an engine host: routers, auth, error shapes, body limit.
* ``engine`` — hosting: :class:`~vinterp_server.engine.LocalEngineHost` (one ``AsyncLLM`` with
  the plugin, vLLM's own OpenAI serving classes on top) and the engine client that attaches
  each request's intervention payload. The app only sees the ``EngineHost`` protocol, so a
  Ray Serve deployment can host the same engine behind the same app.
* ``schemas`` — request/response fields (pydantic; what ``/openapi.json`` shows).
* ``compile`` — HTTP fields → the library's IR, checked before anything reaches the engine.
* ``openai_routes``, ``traces``, ``vectors``, ``captures`` — the routes.
* ``auth``, ``limits``, ``store`` — API keys (hashed), per-key limits, per-key state behind
  one small ``Store`` interface.
* ``metrics``, ``errors``, ``process`` — Prometheus counters, OpenAI-shaped errors (503 when
  the engine died), running a server as a child process (demo, tests, benchmarks).
* ``ray_deployment``, ``ray_store`` — Ray Serve: the same app as an ingress in front of N
  engine replicas (retrying a request whose replica's engine died on another), and the store
  several ingress replicas share through one Ray actor.
"""
