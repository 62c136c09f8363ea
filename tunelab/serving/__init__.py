"""``tunelab serve``: runs and models behind a local OpenAI-compatible HTTP API.

``models`` loads the runs onto one shared base model, ``batching`` groups waiting requests and
generates them together, ``app`` maps the OpenAI routes and errors onto both.
"""
