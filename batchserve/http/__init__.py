"""The Open Inference Protocol over HTTP: routes and the one place errors become responses."""

from batchserve.http.routes import METRICS, REPOSITORY, STATE, add_routes, to_response

__all__ = ["METRICS", "REPOSITORY", "STATE", "add_routes", "to_response"]
