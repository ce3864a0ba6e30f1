"""fleetgate's gateway: an OpenAI-compatible load balancer replica on Starlette + hypercorn."""
