"""HTTP routers: each picks a handler and turns its result into a response, nothing more."""
