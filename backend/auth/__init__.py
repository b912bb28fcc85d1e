"""Identity: passwords, signed access tokens, refresh rotation, API keys, scopes, audit."""
