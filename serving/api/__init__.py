"""The HTTP API on Ray Serve: the application (Ingress and Engine deployments), the
OpenAI wire protocol."""
