"""The OpenAI-compatible HTTP gateway: tokenizes and validates requests, streams them through the routers.

Modules: settings (flags and MOE_* variables), protocol (request bodies), prompts (token ids and sampling),
router_client (RouterPool over gRPC), generation (choices as concurrent router calls), responses (OpenAI
bodies and chunks), http_io (bodies, SSE, disconnects), app (the FastAPI app), server and __main__ (process).
"""
