"""Serving a RetNet: ``retnet quantize``, ``retnet chat`` (a terminal conversation whose state is
kept between turns) and ``retnet serve`` (an OpenAI-shaped HTTP API with continuous batching).

The HTTP server needs the ``[serve]`` extra (FastAPI/Starlette and uvicorn); the rest needs only
the package.
"""
