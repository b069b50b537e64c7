"""The HTTP contract, written once: the rules (patterns, limits, validation into problems), the request
bodies, the parameters of every route and the response bodies, as pydantic models. The handlers validate with
them and build their responses from them; gateway/openapi.py generates the OpenAPI document from them and the
route table (gateway/routes.py)."""
