"""The HTTP edge: routes per concern, request schemas, streaming, guards, and the one mapping of engine errors
to status codes."""
