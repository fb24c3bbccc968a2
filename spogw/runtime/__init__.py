"""Runtime: executor backends, the response cache, the sandbox and the workflow runner."""
