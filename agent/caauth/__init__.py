"""The central CA on Kubernetes: callers authenticated by ServiceAccount token (TokenReview),
node authorization against a cached watch of pods. Sits above agent.identity (the CA itself) and
agent.sources (the list/watch client)."""
