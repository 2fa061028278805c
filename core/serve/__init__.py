"""`glm serve`: an OpenAI-compatible HTTP server with continuous batching over a pool of KV-cache slots.

One module per job: `slots` (the preallocated cache and prefix reuse), `batched` (one decode step over many
slots), `requests` (a request's sampling state and its text), `engine` (the thread that owns the model),
`protocol` (request validation and the OpenAI response shapes), `metrics` (Prometheus text), `app`
(the HTTP handlers, which only queue and stream). Everything but `app` runs without fastapi.
"""
