"""Ingress deployment: the OpenAI-compatible HTTP API and the gRPC servicer, in front of LLMServers."""
