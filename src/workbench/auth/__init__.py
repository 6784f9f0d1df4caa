"""Login: the demo authenticator (embedded only), OAuth/OIDC and GitHub, and roster groups merged at login.

No service code here: a hub process imports this package to authenticate users and nothing more."""
