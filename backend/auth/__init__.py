"""Identity: passwords, signed access tokens, refresh rotation, API keys, scopes, audit; the OAuth
2.0 endpoints, sign-in through an external OpenID Connect provider, revocation, throttling."""
